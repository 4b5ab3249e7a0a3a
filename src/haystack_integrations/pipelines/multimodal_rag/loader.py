"""Load the package's YAML pipelines with the settings that change between machines.

`Pipeline.loads` takes the shipped YAML as it is (embedded Qdrant folder + SQLite multi-vectors under
`index/`, real model ids). `load_pipeline` applies, on the serialized form and before any component is
built, what usually differs:

- `base_dir`: relative store paths (`index/...`) and relative `root_path`s are resolved against it;
- `root_path` (default: `base_dir`): every component that reads files (converter, embedders, rankers, prompt
  builder) is confined to it, so a stored document's `file_path` cannot send an arbitrary file on disk to a
  model or a remote generator. A YAML that sets none gets it; one that sets `null` keeps it (with a warning);
- `models`: `{"dense": ..., "colpali": ..., "vlm": ..., "reranker": ...}` replace the model ids of the matching
  components (`vlm`: the local generator; `reranker`: `VisionLanguageRanker`); components nested in another
  (a retriever wrapped by `FilterAwareRetriever`) are rewritten like top-level ones;
- `embedding_dim`: the dense vector size of the Qdrant document store (1152 for SigLIP so400m);
- `qdrant_url` (default: the `QDRANT_URL` environment variable): switch every embedded Qdrant document store
  to that server or cluster (API key from `QDRANT_API_KEY`), and the SQLite multi-vector store to a
  `QdrantMultiVectorStore` on the same server: how the same pipelines scale past one machine;
- `generator="openai"`: replace the local VLM with Haystack's `OpenAIChatGenerator` (its default model,
  `OPENAI_API_KEY`).

The YAML is parsed with a bound on its alias-expanded size (`bounded_yaml.py`), and the result is a
`MultimodalRAGPipeline`, which checks its stores at `warm_up` before any model runs (`pipeline.py`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from haystack import logging
from haystack.core.serialization import generate_qualified_class_name

from haystack_integrations.common.multimodal_rag.errors import PipelineLoadError
from haystack_integrations.components.builders.multimodal import MultimodalChatPromptBuilder
from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder, ColPaliTextEmbedder
from haystack_integrations.components.embedders.multimodal import (
    MultimodalDocumentEmbedder,
    MultimodalImageEmbedder,
    MultimodalTextEmbedder,
)
from haystack_integrations.components.generators.local_vlm import LocalVLMChatGenerator
from haystack_integrations.components.preprocessors.multimodal import PageQualityFilter
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from haystack_integrations.components.writers.multimodal import StaleDocumentPruner
from haystack_integrations.document_stores.multivector import QdrantMultiVectorStore, SQLiteMultiVectorStore
from haystack_integrations.document_stores.multivector.qdrant_sharing import share_embedded_qdrant_document_stores
from haystack_integrations.document_stores.qdrant import QdrantDocumentStore
from haystack_integrations.pipelines.multimodal_rag.bounded_yaml import load_yaml
from haystack_integrations.pipelines.multimodal_rag.pipeline import MultimodalRAGPipeline

logger = logging.getLogger(__name__)


def _names(*classes: type) -> frozenset[str]:
    return frozenset(generate_qualified_class_name(cls) for cls in classes)


# Type strings as they appear in serialized pipelines, derived from the classes so a move cannot break them.
_DENSE = _names(MultimodalDocumentEmbedder, MultimodalTextEmbedder, MultimodalImageEmbedder)
_COLPALI = _names(ColPaliDocumentEmbedder, ColPaliTextEmbedder, ColPaliRanker)
# `models` keys: which components each replaces the model of. The reranker has its own key: a generator
# checkpoint is not a trained reranker (and MonoQwen is not a generator).
_MODEL_TYPES: dict[str, frozenset[str]] = {
    "dense": _DENSE,
    "colpali": _COLPALI,
    "vlm": _names(LocalVLMChatGenerator),
    "reranker": _names(VisionLanguageRanker),
}
MODEL_KEYS: tuple[str, ...] = tuple(_MODEL_TYPES)
# Every component of the package that opens files named by documents or sources (they all take `root_path`).
READS_FILES: tuple[type, ...] = (
    MultimodalFileToDocument,
    MultimodalDocumentEmbedder,
    MultimodalImageEmbedder,
    ColPaliDocumentEmbedder,
    ColPaliRanker,
    VisionLanguageRanker,
    MultimodalChatPromptBuilder,
    PageQualityFilter,
    StaleDocumentPruner,
)
_READS_FILES = _names(*READS_FILES)
_LOCAL_GENERATOR = generate_qualified_class_name(LocalVLMChatGenerator)
_QDRANT_STORE = generate_qualified_class_name(QdrantDocumentStore)
_SQLITE_STORE = generate_qualified_class_name(SQLiteMultiVectorStore)
_QDRANT_MV_STORE = generate_qualified_class_name(QdrantMultiVectorStore)
_QDRANT_KEY = {"type": "env_var", "env_vars": ["QDRANT_API_KEY"], "strict": False}
_OPENAI = "haystack.components.generators.chat.openai.OpenAIChatGenerator"


def shipped_pipeline(name: str) -> Path:
    """
    Path of a pipeline YAML shipped with the package (`"indexing.yaml"`, `"rag.yaml"`).

    Installed wheels carry them inside the package (`pipelines/multimodal_rag/shipped/`); a source checkout or an
    editable install reads them from the repository's `examples/pipelines/`.

    :param name: The file name.
    :returns: The path.
    :raises FileNotFoundError: When neither place has the file.
    """
    for folder in (
        Path(__file__).resolve().parent / "shipped",
        Path(__file__).resolve().parents[4] / "examples" / "pipelines",
    ):
        if (folder / name).is_file():
            return folder / name
    msg = f"no shipped pipeline named {name!r} (looked in the installed package and in examples/pipelines)"
    raise FileNotFoundError(msg)


def _refuse(problem: str) -> NoReturn:
    msg = f"not a Haystack pipeline: {problem}"
    raise PipelineLoadError(msg)


def _check_shape(data: Any) -> None:
    """Refuse, with one clear error, what is not a serialized pipeline (before anything is rewritten or built)."""
    if not isinstance(data, dict):
        _refuse(f"the YAML is a {type(data).__name__}, not a mapping")
    components = data.get("components", {})
    if not isinstance(components, dict):
        _refuse(f"'components' is a {type(components).__name__}, not a mapping of name to component")
    for name, component in components.items():
        if not isinstance(name, str):
            _refuse(f"component name {name!r} ({type(name).__name__}) is not a string")
        if not isinstance(component, dict) or not isinstance(component.get("type"), str):
            _refuse(f"component '{name}' is not a mapping with a 'type'")
        if not isinstance(component.get("init_parameters", {}), dict):
            _refuse(f"component '{name}' has 'init_parameters' that are not a mapping")
    connections = data.get("connections", [])
    if not isinstance(connections, list):
        _refuse(f"'connections' is a {type(connections).__name__}, not a list")
    for position, connection in enumerate(connections):
        if not (
            isinstance(connection, dict)
            and isinstance(connection.get("sender"), str)
            and isinstance(connection.get("receiver"), str)
        ):
            _refuse(f"connection {position} ({connection!r}) is not a mapping with a 'sender' and a 'receiver'")


# Serialized classes the loader rewrites: one of them nested with malformed parameters must be refused, not
# skipped (skipping would silently leave a file-reading component without its root_path).
_REWRITTEN = frozenset().union(*_MODEL_TYPES.values(), _READS_FILES)
_STORES = frozenset({_QDRANT_STORE, _SQLITE_STORE, _QDRANT_MV_STORE})


def _is_component(value: Any, where: str) -> bool:
    """
    Whether `value` is a serialized component nested in another's parameters.

    A mapping with a qualified class name in `type` (`"package.module.Class"`, which tells it from a serialized
    Secret or device, `{"type": "env_var", ...}`) and mapping `init_parameters`; for a class the loader rewrites,
    `init_parameters` may be left out. Other mappings (a serialized `Tool`: `type` and `data`) are left alone.
    """
    if not (isinstance(value, dict) and isinstance(value.get("type"), str) and "." in value["type"]):
        return False
    ours = value["type"] in _REWRITTEN
    if "init_parameters" not in value:
        return ours
    if not isinstance(value["init_parameters"], dict):
        if ours:
            _refuse(f"'{where}' has 'init_parameters' that are not a mapping")
        return False
    return True


def _check_path(where: str, key: str, params: dict[str, Any]) -> None:
    value = params.get(key)
    if value is not None and not isinstance(value, (str, os.PathLike)):
        _refuse(f"'{where}' has {key}: {value!r} ({type(value).__name__}); expected a path string or null")


def _check_models(models: Any) -> dict[str, str]:
    if models is None:
        return {}
    if not isinstance(models, Mapping):
        msg = (
            f"models must be a mapping like {{'dense': model_id}}, got a {type(models).__name__} ({models!r}); "
            f"the keys are {list(MODEL_KEYS)}"
        )
        raise PipelineLoadError(msg)
    unknown = set(models) - set(MODEL_KEYS)
    if unknown:
        msg = f"models has unknown keys {sorted(unknown, key=str)}; the keys are {list(MODEL_KEYS)}"
        raise PipelineLoadError(msg)
    checked: dict[str, str] = {}
    for key, model in models.items():
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str) or not model.strip():
            msg = (
                f"models['{key}'] is {model!r}; expected a model id or a local checkpoint path "
                "(leave the key out to keep the YAML's model)"
            )
            raise PipelineLoadError(msg)
        checked[key] = model
    return checked


def _absolute(path: str | os.PathLike[str] | None, base_dir: Path | None) -> str | None:
    if path is None:
        return None
    if base_dir is None or Path(path).is_absolute():
        return os.fspath(path)
    return str((base_dir / path).resolve())


def _rewrite_store(
    store: dict[str, Any], where: str, *, base_dir: Path | None, qdrant_url: str | None, embedding_dim: int | None
) -> dict[str, Any]:
    if not isinstance(store.get("init_parameters", {}), dict):
        _refuse(f"'{where}' has 'init_parameters' that are not a mapping")
    params = store.setdefault("init_parameters", {})
    if store.get("type") in _STORES:
        _check_path(where, "path", params)
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


def _confine(name: str, params: dict[str, Any], *, base: Path | None, root: str | None) -> None:
    _check_path(name, "root_path", params)
    if root is not None:
        params["root_path"] = root
    elif "root_path" not in params:
        if base is not None:
            params["root_path"] = str(base)
    elif params["root_path"] is None:
        logger.warning(
            "Component '{component}' has root_path: null, so a document's file_path can make it read any file "
            "on disk (and send it to a model). Set root_path to the folder of your files.",
            component=name,
        )
    else:
        params["root_path"] = _absolute(params["root_path"], base)


def rewrite_pipeline_dict(
    data: dict[str, Any],
    *,
    base_dir: str | Path | None = None,
    models: dict[str, str] | None = None,
    embedding_dim: int | None = None,
    qdrant_url: str | None = None,
    generator: str | None = None,
    root_path: str | Path | None = None,
) -> dict[str, Any]:
    """
    Apply `load_pipeline`'s settings to a serialized pipeline (returns a modified copy).

    :param data: The pipeline as a dict (e.g. `yaml.safe_load` of a shipped YAML).
    :param base_dir: Directory relative store paths and relative `root_path`s are resolved against.
    :param models: `{"dense": id, "colpali": id, "vlm": id, "reranker": id}` (`vlm`: the local generator;
        `reranker`: `VisionLanguageRanker`); missing keys keep the YAML's models. Components nested in
        another's parameters, directly or in a list, are rewritten like top-level ones.
    :param embedding_dim: Dense vector size for Qdrant document stores.
    :param qdrant_url: Qdrant server/cluster URL; `None` keeps the embedded stores.
    :param generator: `"openai"` swaps the local VLM generator for `OpenAIChatGenerator`.
    :param root_path: Directory every file-reading component is confined to; replaces the YAML's values.
        `None`: a component without a `root_path` gets `base_dir` (when given), a relative one is resolved
        against `base_dir`, an explicit `null` is kept (with a warning).
    :returns: The rewritten dict.
    :raises ValueError: On an unknown `generator` value.
    :raises PipelineLoadError: When `data` is not shaped like a serialized pipeline (the message names the
        component and key), or `models` is not a mapping of known keys to model ids.
    """
    if generator not in (None, "local", "openai"):
        msg = f"generator must be None, 'local' or 'openai', got {generator!r}"
        raise ValueError(msg)
    _check_shape(data)
    out = copy.deepcopy(data)
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else None
    root = str(Path(root_path).expanduser().resolve()) if root_path is not None else None
    model_ids = _check_models(models)

    def rewrite_nested(name: str, value: Any) -> None:
        # A component that wraps others (FilterAwareRetriever's `retriever`, or a list of them) gets the same
        # treatment as a top-level one.
        if _is_component(value, name):
            rewrite(name, value)
        elif isinstance(value, list):
            for position, item in enumerate(value):
                rewrite_nested(f"{name}[{position}]", item)

    def rewrite(name: str, component: dict[str, Any]) -> None:
        ctype = component.get("type")
        params = component.setdefault("init_parameters", {})
        if ctype in _READS_FILES:
            _confine(name, params, base=base, root=root)
        for key, classes in _MODEL_TYPES.items():
            if ctype in classes and key in model_ids:
                params["model"] = model_ids[key]
        for key in ("document_store", "multivector_store"):
            if isinstance(params.get(key), dict):
                params[key] = _rewrite_store(
                    params[key], f"{name}.{key}", base_dir=base, qdrant_url=qdrant_url, embedding_dim=embedding_dim
                )
        if isinstance(params.get("state_path"), str):
            params["state_path"] = _absolute(params["state_path"], base)
        for key, value in params.items():
            if key not in ("document_store", "multivector_store"):
                rewrite_nested(f"{name}.{key}", value)
        if generator == "openai" and ctype == _LOCAL_GENERATOR:
            generation_kwargs = params.get("generation_kwargs") or {}
            if not isinstance(generation_kwargs, dict):
                _refuse(f"'{name}' has generation_kwargs that are not a mapping: {generation_kwargs!r}")
            max_tokens = generation_kwargs.get("max_new_tokens", 256)
            component["type"] = _OPENAI
            component["init_parameters"] = {
                "api_key": {"type": "env_var", "env_vars": ["OPENAI_API_KEY"], "strict": True},
                "generation_kwargs": {"max_completion_tokens": max_tokens},
            }

    for name, component in out.get("components", {}).items():
        rewrite(name, component)
    return out


def load_pipeline(
    source: str | Path,
    *,
    base_dir: str | Path | None = None,
    models: dict[str, str] | None = None,
    embedding_dim: int | None = None,
    qdrant_url: str | None = None,
    generator: str | None = None,
    root_path: str | Path | None = None,
) -> MultimodalRAGPipeline:
    """
    Load a YAML pipeline (a file path, or YAML text) with machine-specific settings applied.

    The YAML is parsed safely with a bound on its alias-expanded size. The pipeline checks its stores when it
    warms up, before any model runs (a query pipeline without an index, a Qdrant folder held by another
    process, a wrong `embedding_dim`: see `MultimodalRAGPipeline`); loading a query pipeline whose index does
    not exist yet logs a warning naming the folder.

    :param source: Path of a YAML file, or the YAML text itself.
    :param base_dir: Directory relative store paths (`index/...`) and relative `root_path`s are resolved
        against; defaults to the working directory.
    :param models: `{"dense": id, "colpali": id, "vlm": id, "reranker": id}` to replace the YAML's model ids
        (`vlm`: the local generator; `reranker`: `VisionLanguageRanker`); an unknown key is a `ValueError`.
    :param embedding_dim: Dense vector size of the Qdrant document store (when the dense model changes).
    :param qdrant_url: Qdrant server or cluster URL; defaults to the `QDRANT_URL` environment variable.
    :param generator: `"openai"` to use `OpenAIChatGenerator` instead of the local VLM.
    :param root_path: Directory every component that reads files is confined to (documents' relative
        `file_path`s resolve in it); defaults to `base_dir`. Index and query with the same one.
    :returns: The pipeline (components are not warmed up yet).
    :raises PipelineLoadError: On an alias bomb, invalid YAML, a directory or binary file, a one-line `source`
        that names no file (a mistyped path), or YAML that is not a pipeline (the message names the component
        and key).
    :raises FileNotFoundError: When `source` names a `.yaml`/`.yml` file that does not exist.
    :raises TypeError: When `source` is neither a path nor a string.
    """
    if not isinstance(source, (str, os.PathLike)):
        msg = f"source must be a YAML file path or YAML text, got a {type(source).__name__}"
        raise TypeError(msg)
    if _looks_like_path(source) and Path(source).is_dir():
        msg = f"{source} is a directory, not a pipeline YAML file"
        raise PipelineLoadError(msg)
    try:
        text = Path(source).read_text(encoding="utf-8") if _looks_like_path(source) else str(source)
    except UnicodeDecodeError as e:
        msg = f"{source} is not a YAML file (not UTF-8 text: {e})"
        raise PipelineLoadError(msg) from e
    data = load_yaml(text)
    if isinstance(data, str) and "\n" not in str(source).strip() and not _looks_like_path(source):
        # One line that parses as a YAML string: a mistyped path (no such file, no .yaml suffix), not pipeline text.
        # The path named is the one looked at: '~' is not expanded (a file under the home folder may exist).
        msg = (
            f"{str(source)!r} is neither a file (no such file: {Path(source).resolve()}) nor the YAML "
            "text of a pipeline: pass the path of a pipeline YAML file (e.g. 'examples/pipelines/rag.yaml'; "
            "shipped_pipeline('rag.yaml') gives the installed copy's path)"
        )
        if str(source).startswith("~"):
            msg += "; '~' is not expanded here: pass os.path.expanduser(path)"
        raise PipelineLoadError(msg)
    if not isinstance(data, dict):
        msg = f"a pipeline YAML is a mapping with 'components' and 'connections', got {type(data).__name__}"
        raise PipelineLoadError(msg)
    if qdrant_url is None:
        qdrant_url = os.environ.get("QDRANT_URL") or None
    rewritten = rewrite_pipeline_dict(
        data,
        base_dir=base_dir if base_dir is not None else Path.cwd(),
        models=models,
        embedding_dim=embedding_dim,
        qdrant_url=qdrant_url,
        generator=generator,
        root_path=root_path,
    )
    # Several components of one pipeline (writer, retriever, ...) open the same embedded Qdrant folder, which
    # Qdrant's local mode locks per client: make them share one client (see qdrant_sharing.py).
    share_embedded_qdrant_document_stores()
    pipeline = MultimodalRAGPipeline.from_dict(rewritten)
    for path in pipeline.missing_indexes():
        logger.warning(
            "No index at {path}: this pipeline only reads it, so it will refuse to run until an indexing pipeline "
            "has written there (base_dir is {base_dir}; check it if the index should already exist).",
            path=str(path),
            base_dir=str(Path(base_dir).expanduser().resolve() if base_dir is not None else Path.cwd()),
        )
    if not pipeline.missing_indexes():
        for path in pipeline.missing_multivector_files():
            logger.warning(
                "No multi-vector file at {path}: the ranker will encode pages at query time.", path=str(path)
            )
    return pipeline


def _looks_like_path(source: str | os.PathLike[str]) -> bool:
    if not isinstance(source, str):
        return True
    return "\n" not in source and (source.endswith((".yaml", ".yml")) or Path(source).exists())
