"""Load the package's YAML pipelines with the settings that change between machines.

`Pipeline.loads` takes the shipped YAML as it is (embedded Qdrant folder + SQLite multi-vectors under
`index/`, real model ids). `load_pipeline` applies, on the serialized form and before any component is
built, what usually differs:

- `base_dir`: relative store paths (`index/...`) are resolved against it;
- `models`: `{"dense": ..., "colpali": ..., "vlm": ...}` replace the model ids of the matching components;
- `embedding_dim`: the dense vector size of the Qdrant document store (1152 for SigLIP so400m);
- `qdrant_url` (default: the `QDRANT_URL` environment variable): switch every embedded Qdrant document store
  to that server or cluster (API key from `QDRANT_API_KEY`), and the SQLite multi-vector store to a
  `QdrantMultiVectorStore` on the same server: how the same pipelines scale past one machine;
- `generator="openai"`: replace the local VLM with Haystack's `OpenAIChatGenerator` (its default model,
  `OPENAI_API_KEY`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from haystack import Pipeline
from haystack.core.serialization import generate_qualified_class_name

from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder, ColPaliTextEmbedder
from haystack_integrations.components.embedders.multimodal import (
    MultimodalDocumentEmbedder,
    MultimodalImageEmbedder,
    MultimodalTextEmbedder,
)
from haystack_integrations.components.generators.local_vlm import LocalVLMChatGenerator
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from haystack_integrations.document_stores.multivector import QdrantMultiVectorStore, SQLiteMultiVectorStore
from haystack_integrations.document_stores.multivector.qdrant_sharing import share_embedded_qdrant_document_stores
from haystack_integrations.document_stores.qdrant import QdrantDocumentStore


def _names(*classes: type) -> frozenset[str]:
    return frozenset(generate_qualified_class_name(cls) for cls in classes)


# Type strings as they appear in serialized pipelines, derived from the classes so a move cannot break them.
_DENSE = _names(MultimodalDocumentEmbedder, MultimodalTextEmbedder, MultimodalImageEmbedder)
_COLPALI = _names(ColPaliDocumentEmbedder, ColPaliTextEmbedder, ColPaliRanker)
_VLM = _names(LocalVLMChatGenerator, VisionLanguageRanker)
_LOCAL_GENERATOR = generate_qualified_class_name(LocalVLMChatGenerator)
_QDRANT_STORE = generate_qualified_class_name(QdrantDocumentStore)
_SQLITE_STORE = generate_qualified_class_name(SQLiteMultiVectorStore)
_QDRANT_MV_STORE = generate_qualified_class_name(QdrantMultiVectorStore)
_QDRANT_KEY = {"type": "env_var", "env_vars": ["QDRANT_API_KEY"], "strict": False}
_OPENAI = "haystack.components.generators.chat.openai.OpenAIChatGenerator"


def _absolute(path: str | None, base_dir: Path | None) -> str | None:
    if path is None or base_dir is None or Path(path).is_absolute():
        return path
    return str((base_dir / path).resolve())


def _rewrite_store(
    store: dict[str, Any], *, base_dir: Path | None, qdrant_url: str | None, embedding_dim: int | None
) -> dict[str, Any]:
    params = store.setdefault("init_parameters", {})
    if store.get("type") == _QDRANT_STORE:
        if embedding_dim is not None:
            params["embedding_dim"] = embedding_dim
        if qdrant_url:
            params.update(path=None, location=None, url=qdrant_url, api_key=dict(_QDRANT_KEY))
        else:
            params["path"] = _absolute(params.get("path"), base_dir)
        return store
    if store.get("type") == _SQLITE_STORE:
        if qdrant_url:
            return {
                "type": _QDRANT_MV_STORE,
                "init_parameters": {
                    "url": qdrant_url,
                    "api_key": dict(_QDRANT_KEY),
                    "collection": "multivectors",
                    "dim": params.get("dim", 128),
                    "dtype": params.get("dtype", "float16"),
                },
            }
        params["path"] = _absolute(params.get("path"), base_dir)
    if store.get("type") == _QDRANT_MV_STORE and not qdrant_url:
        params["path"] = _absolute(params.get("path"), base_dir)
    return store


def rewrite_pipeline_dict(
    data: dict[str, Any],
    *,
    base_dir: str | Path | None = None,
    models: dict[str, str] | None = None,
    embedding_dim: int | None = None,
    qdrant_url: str | None = None,
    generator: str | None = None,
) -> dict[str, Any]:
    """
    Apply `load_pipeline`'s settings to a serialized pipeline (returns a modified copy).

    :param data: The pipeline as a dict (e.g. `yaml.safe_load` of a shipped YAML).
    :param base_dir: Directory relative store paths are resolved against.
    :param models: `{"dense": id, "colpali": id, "vlm": id}`; missing keys keep the YAML's models.
    :param embedding_dim: Dense vector size for Qdrant document stores.
    :param qdrant_url: Qdrant server/cluster URL; `None` keeps the embedded stores.
    :param generator: `"openai"` swaps the local VLM generator for `OpenAIChatGenerator`.
    :returns: The rewritten dict.
    :raises ValueError: On an unknown `generator` value.
    """
    if generator not in (None, "local", "openai"):
        msg = f"generator must be None, 'local' or 'openai', got {generator!r}"
        raise ValueError(msg)
    out = copy.deepcopy(data)
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else None
    models = models or {}
    for component in out.get("components", {}).values():
        ctype = component.get("type")
        params = component.setdefault("init_parameters", {})
        if ctype in _DENSE and "dense" in models:
            params["model"] = models["dense"]
        if ctype in _COLPALI and "colpali" in models:
            params["model"] = models["colpali"]
        if ctype in _VLM and "vlm" in models:
            params["model"] = models["vlm"]
        for key in ("document_store", "multivector_store"):
            if isinstance(params.get(key), dict):
                params[key] = _rewrite_store(
                    params[key], base_dir=base, qdrant_url=qdrant_url, embedding_dim=embedding_dim
                )
        if isinstance(params.get("state_path"), str):
            params["state_path"] = _absolute(params["state_path"], base)
        if generator == "openai" and ctype == _LOCAL_GENERATOR:
            max_tokens = (params.get("generation_kwargs") or {}).get("max_new_tokens", 256)
            component["type"] = _OPENAI
            component["init_parameters"] = {
                "api_key": {"type": "env_var", "env_vars": ["OPENAI_API_KEY"], "strict": True},
                "generation_kwargs": {"max_completion_tokens": max_tokens},
            }
    return out


def load_pipeline(
    source: str | Path,
    *,
    base_dir: str | Path | None = None,
    models: dict[str, str] | None = None,
    embedding_dim: int | None = None,
    qdrant_url: str | None = None,
    generator: str | None = None,
) -> Pipeline:
    """
    Load a YAML pipeline (a file path, or YAML text) with machine-specific settings applied.

    :param source: Path of a YAML file, or the YAML text itself.
    :param base_dir: Directory relative store paths (`index/...`) are resolved against; defaults to the
        working directory.
    :param models: `{"dense": id, "colpali": id, "vlm": id}` to replace the YAML's model ids.
    :param embedding_dim: Dense vector size of the Qdrant document store (when the dense model changes).
    :param qdrant_url: Qdrant server or cluster URL; defaults to the `QDRANT_URL` environment variable.
    :param generator: `"openai"` to use `OpenAIChatGenerator` instead of the local VLM.
    :returns: The pipeline (components are not warmed up yet).
    """
    text = Path(source).read_text(encoding="utf-8") if _looks_like_path(source) else str(source)
    data = yaml.safe_load(text)
    if qdrant_url is None:
        qdrant_url = os.environ.get("QDRANT_URL") or None
    rewritten = rewrite_pipeline_dict(
        data,
        base_dir=base_dir if base_dir is not None else Path.cwd(),
        models=models,
        embedding_dim=embedding_dim,
        qdrant_url=qdrant_url,
        generator=generator,
    )
    # Several components of one pipeline (writer, retriever, ...) open the same embedded Qdrant folder, which
    # Qdrant's local mode locks per client: make them share one client (see qdrant_sharing.py).
    share_embedded_qdrant_document_stores()
    return Pipeline.from_dict(rewritten)


def _looks_like_path(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    return "\n" not in source and (source.endswith((".yaml", ".yml")) or Path(source).exists())
