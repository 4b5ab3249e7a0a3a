from __future__ import annotations

import shutil
from pathlib import Path

from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, checkpoint_fingerprint
from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_siglip


def test_checkpoint_fingerprint_follows_the_weights_not_the_folder(tmp_path: Path) -> None:
    first = build_tiny_siglip(tmp_path / "first", seed=0)
    other = build_tiny_siglip(tmp_path / "other", seed=1)
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    assert checkpoint_fingerprint(str(first)).startswith("sha256:")
    assert checkpoint_fingerprint(str(first)) == checkpoint_fingerprint(str(moved))
    assert checkpoint_fingerprint(str(first)) != checkpoint_fingerprint(str(other))


def test_checkpoint_fingerprint_of_an_unknown_id_falls_back_to_the_id() -> None:
    assert checkpoint_fingerprint("no-such-org/no-such-model") == "id:no-such-org/no-such-model"


def test_processor_kwargs_are_part_of_the_loaded_model_identity() -> None:
    base = {"model": "m", "component": "C", "device": "cpu", "token": None, "local_files_only": True}
    plain = LoadSpec(**base, model_kwargs=None)
    budget = LoadSpec(**base, model_kwargs=None, processor_kwargs={"max_pixels": 1000})
    assert plain.cache_key() != budget.cache_key()
