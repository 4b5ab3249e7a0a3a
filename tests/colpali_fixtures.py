"""Tiny checkpoints of every colpali-engine family, built once per test session (imported by the ColPali tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from haystack_integrations.testing.multimodal_rag.tiny_colpali import build_tiny_colpali_family


@pytest.fixture(scope="session", name="tiny_colpali_family")
def tiny_colpali_family_fixture(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """`get(family)`: the path of a tiny checkpoint of that colpali-engine family (built on first use)."""
    root = tmp_path_factory.mktemp("tiny_colpali_families")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(build_tiny_colpali_family(Path(root) / family, family))
        return built[family]

    return get
