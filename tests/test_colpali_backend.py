from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from haystack import Document

from haystack_integrations.common.multimodal_rag.backends.colpali import (
    detect_family,
    family_from_config,
)
from haystack_integrations.common.multimodal_rag.errors import (
    ModelLoadError,
)
from haystack_integrations.components.embedders.colpali import ColPaliTextEmbedder
from tests.helpers import COLORS, make_image, make_pdf


@pytest.fixture
def pages_dir(tmp_path: Path) -> Path:
    for i, color in enumerate(COLORS[:5]):
        make_image(tmp_path / f"page{i}.png", size=(56 + 14 * i, 56), color=color)
    make_pdf(tmp_path / "deck.pdf", pages=3, size=(80, 60))
    return tmp_path


def _page_docs(pages_dir: Path) -> list[Document]:
    docs = [Document(meta={"file_path": str(pages_dir / f"page{i}.png")}, score=0.5 - i / 100) for i in range(5)]
    docs += [Document(meta={"file_path": str(pages_dir / "deck.pdf"), "page_number": p}, score=0.3) for p in (1, 2, 3)]
    return docs


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"architectures": ["ColQwen2_5"], "model_type": "qwen2_5_vl"}, "ColQwen2_5"),
        ({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}, "ColQwen2"),
        ({"architectures": ["ColPali"], "model_type": "paligemma"}, "ColPali"),
        ({"model_type": "idefics3"}, "ColIdefics3"),
        ({"architectures": ["MyRenamedRetriever"], "model_type": "qwen2_5_vl"}, "ColQwen2_5"),
    ],
)
def test_family_comes_from_the_config_not_the_name(config: dict, expected: str) -> None:
    assert family_from_config(config, model="org/anything").model_class == expected


def test_unsupported_config_names_the_supported_families() -> None:
    with pytest.raises(ModelLoadError, match=r"not a ColPali-family checkpoint.*ColQwen2_5 \(qwen2_5_vl\)"):
        family_from_config({"architectures": ["BertModel"], "model_type": "bert"}, model="bert-base")


def test_peft_adapter_checkpoint_is_followed_to_its_base(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    family = detect_family(str(adapter), token=None, local_files_only=True, component="Test")
    assert family.model_class == "ColQwen2_5"


def test_a_peft_adapter_checkpoint_loads_through_the_components_and_applies(
    tiny_colqwen2_5: str, tmp_path: Path
) -> None:
    from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_colpali_adapter

    adapter = build_tiny_colpali_adapter(tmp_path / "adapter", tiny_colqwen2_5)
    assert not (adapter / "config.json").exists()
    with_adapter = ColPaliTextEmbedder(str(adapter)).run(text="hello")["multivector_embedding"]
    base = ColPaliTextEmbedder(tiny_colqwen2_5).run(text="hello")["multivector_embedding"]
    assert np.asarray(with_adapter).shape == np.asarray(base).shape
    assert not np.allclose(with_adapter, base)


def test_a_dual_encoder_is_refused_as_colpali_model(tiny_siglip: str) -> None:
    with pytest.raises(ModelLoadError, match="not a ColPali-family checkpoint"):
        ColPaliTextEmbedder(tiny_siglip).warm_up()


def test_missing_model_fails_in_warm_up_with_advice(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"local directory path|local path"):
        ColPaliTextEmbedder("org/not-cached-colpali", local_files_only=True).warm_up()
