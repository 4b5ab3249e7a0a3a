"""Tiny checkpoints for the vision-language components' tests (ranker and generator).

Registered as a pytest plugin by `tests/conftest.py`; each fixture reuses a checkpoint already written in the
session's model folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from haystack_integrations.testing.multimodal_rag.tiny_vlm import (
    build_tiny_monoqwen_adapter,
    build_tiny_qwen2_vl_instruct,
)


def _built(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


@pytest.fixture(scope="session")
def tiny_instruct(models_dir: Path) -> str:
    """A tiny Qwen2-VL-Instruct-style checkpoint (real chat template; True/False/yes/no/Yes/No single tokens)."""
    folder = models_dir / "qwen2_vl_instruct"
    return str(folder if _built(folder, "config.json") else build_tiny_qwen2_vl_instruct(folder))


@pytest.fixture(scope="session")
def tiny_monoqwen(models_dir: Path, tiny_instruct: str) -> str:
    """A LoRA adapter on `tiny_instruct` laid out like lightonai/MonoQwen2-VL-v0.1 (no processor files)."""
    folder = models_dir / "monoqwen"
    return str(folder if _built(folder, "adapter_config.json") else build_tiny_monoqwen_adapter(folder, tiny_instruct))


@pytest.fixture(scope="session")
def tiny_instruct_full_budget(models_dir: Path) -> str:
    """Like `tiny_instruct`, with the real checkpoints' max_pixels (12845056, 16384 visual tokens)."""
    folder = models_dir / "qwen2_vl_instruct_full"
    if _built(folder, "config.json"):
        return str(folder)
    return str(build_tiny_qwen2_vl_instruct(folder, max_pixels=12845056))
