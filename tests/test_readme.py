"""The README's code-like claims match the code: the signatures and calls it prints (parameter names, order and
defaults), the meta keys of "Shared meta keys", the repository files it names and the command-line flags it passes.

Only code-shaped text is checked (inline code spans parsed with `ast`, file paths, `--flags`), never prose.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from haystack_integrations.document_stores.multivector import MultiVectorStore
from haystack_integrations.evaluation.multimodal_rag.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

PUBLIC_PACKAGES = [
    "haystack_integrations.components.converters.multimodal",
    "haystack_integrations.components.preprocessors.multimodal",
    "haystack_integrations.components.embedders.multimodal",
    "haystack_integrations.components.embedders.colpali",
    "haystack_integrations.components.rankers.colpali",
    "haystack_integrations.components.rankers.vlm",
    "haystack_integrations.components.rankers.modality_calibration",
    "haystack_integrations.components.monitors.alignment_drift",
    "haystack_integrations.components.builders.multimodal",
    "haystack_integrations.components.generators.local_vlm",
    "haystack_integrations.components.retrievers.oversampling",
    "haystack_integrations.components.writers.multimodal",
    "haystack_integrations.document_stores.multivector",
    "haystack_integrations.evaluation.multimodal_rag",
    "haystack_integrations.pipelines.multimodal_rag",
]


def _public_callables() -> dict[str, Callable[..., Any]]:
    """Name -> the callable whose signature the README prints for it (a class: its `__init__`)."""
    names: dict[str, Callable[..., Any]] = {}
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and not issubclass(obj, BaseException) and "__init__" in vars(obj):
                names[name] = obj.__init__
                names.update({f"{name}.{m}": getattr(obj, m) for m in ("run", "warm_up") if hasattr(obj, m)})
            elif inspect.isfunction(obj):
                names[name] = obj
    # The store contract's methods are printed bare (`score(query_vectors, ids, *, device=None)`).
    for method in ("write", "get", "delete", "count", "close", "score", "bind_model", "bind_pool_factor"):
        names[method] = getattr(MultiVectorStore, method)
    return names


CALLABLES = _public_callables()


def _inline_code_spans(text: str) -> Iterator[str]:
    """Inline code spans outside fenced blocks, one paragraph at a time (a span may wrap lines)."""
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.DOTALL | re.MULTILINE)
    for paragraph in re.split(r"\n\s*\n", prose):
        for span in re.findall(r"`([^`]+)`", paragraph):
            yield re.sub(r"\s*\n\s*", " ", span).strip()


def _split_top_level(args: str) -> list[str] | None:
    """`args` cut at its top-level commas, or `None` when its brackets do not balance (two chained calls)."""
    parts, depth, current, quote = [], 0, "", ""
    for char in args:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return [*parts, current] if depth == 0 else None


def _shown_parts(args: str) -> list[str]:
    """The printed parameters of a balanced argument list, `...` left out."""
    parts = _split_top_level(args)
    assert parts is not None, f"unbalanced brackets in {args!r}"
    return [part.strip() for part in parts if part.strip() and part.strip() != "..."]


def _printed_calls(text: str = README) -> list[tuple[str, str, str]]:
    """`(span, name, argument text)` for every inline span that prints a call of a public callable."""
    calls = []
    for span in _inline_code_spans(text):
        match = re.fullmatch(r"(?:with )?([A-Za-z_][\w.]*)\((.*)\)(?: as \w+:)?(?: -> .*)?", span)
        # `X(...).run(query, documents=docs)` matches with the arguments of two calls: not one signature or call.
        if match and match.group(1) in CALLABLES and _split_top_level(match.group(2)) is not None:
            calls.append((span, match.group(1), match.group(2)))
    return calls


PRINTED = _printed_calls()


def _parse_printed(name: str, args: str) -> tuple[bool, list[tuple[str, Any]]]:
    """
    Parse a printed argument list.

    :returns: `(is_signature, [(parameter, shown value or the marker _REQUIRED / _ANY)])`. A list with a bare
        `*` is a signature (its values are the defaults); otherwise a call (its values are examples).
    """
    parts = _shown_parts(args)
    is_signature = "*" in parts
    shown: list[tuple[str, Any]] = []
    for part in parts:
        if part == "*":
            continue
        if "=" in part and not part.startswith(("'", '"')):
            key, _, value = part.partition("=")
            tree = ast.parse(value.strip(), mode="eval").body
            shown.append((key.strip(), _ANY if isinstance(tree, ast.Constant) and tree.value is ... else tree))
        elif is_signature and re.fullmatch(r"[A-Za-z_]\w*", part):
            shown.append((part, _REQUIRED))
        # a positional value in a call (`score(query, ids)`) names no parameter
    return is_signature, shown


_REQUIRED = object()
_ANY = object()


def test_a_chained_call_is_not_read_as_the_first_callables_arguments() -> None:
    # Read as ColPaliRanker's arguments, `documents=docs` failed as "ColPaliRanker has no parameter ['documents']".
    text = "Call `ColPaliRanker(...).run(query, documents=docs)` or `ColPaliRanker(top_k=5)`."
    assert _printed_calls(text) == [("ColPaliRanker(top_k=5)", "ColPaliRanker", "top_k=5")]


def test_the_readme_prints_the_main_component_signatures() -> None:
    signatures = {name for _, name, args in PRINTED if _parse_printed(name, args)[0]}
    assert {"ColPaliDocumentEmbedder", "ColPaliTextEmbedder", "ColPaliRanker", "SQLiteMultiVectorStore"} <= signatures


@pytest.mark.parametrize(("span", "name", "args"), PRINTED, ids=[span[:60] for span, _, _ in PRINTED])
def test_a_printed_signature_or_call_matches_the_code(span: str, name: str, args: str) -> None:
    is_signature, shown = _parse_printed(name, args)
    parameters = {p: v for p, v in inspect.signature(CALLABLES[name]).parameters.items() if p != "self"}
    unknown = [key for key, _ in shown if key not in parameters]
    assert not unknown, f"README `{span}`: {name} has no parameter {unknown}; it takes {list(parameters)}"
    if not is_signature:
        return
    order = [key for key, _ in shown]
    assert order == sorted(order, key=list(parameters).index), (
        f"README `{span}`: parameters shown out of the code's order {list(parameters)}"
    )
    for key, value in shown:
        default = parameters[key].default
        if value is _ANY:
            continue
        if value is _REQUIRED:
            assert default is inspect.Parameter.empty, (
                f"README `{span}` shows {key} without a default; the code's default is {default!r}"
            )
            continue
        assert default is not inspect.Parameter.empty, f"README `{span}` gives {key} a default; the code has none"
        assert ast.literal_eval(value) == default, (
            f"README `{span}` says {key}={ast.unparse(value)}; the code's default is {default!r}"
        )
        keyword_only = parameters[key].kind is inspect.Parameter.KEYWORD_ONLY
        assert keyword_only == (order.index(key) >= _star_position(args)), (
            f"README `{span}`: {key} is {'keyword-only' if keyword_only else 'positional'} in the code"
        )


def _star_position(args: str) -> int:
    parts = _shown_parts(args)
    return parts.index("*")


def _string_constants() -> set[str]:
    constants = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                constants.add(node.value)
    return constants


def test_every_shared_meta_key_is_a_key_the_code_uses() -> None:
    section = README.split("## Shared meta keys", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    keys = [key for row in rows for key in re.findall(r"`(\w+)`", row.split(" | ")[0])]
    assert len(keys) >= 15
    constants = _string_constants()
    missing = [key for key in keys if key not in constants]
    assert not missing, f"README 'Shared meta keys' names keys no code sets or reads: {missing}"


def test_every_repository_file_the_readme_names_exists() -> None:
    paths = set(re.findall(r"(?<![\w/])(?:tests|benchmarks|examples|integration_tests)/[\w/.-]*\w", README))
    paths |= {f"tests/{name}" for name in re.findall(r"(?<![\w/])(test_\w+\.py)", README)}
    paths |= {
        f"src/haystack_integrations/{path}"
        for path in re.findall(r"(?<![\w/])(common/multimodal_rag/[\w/]+\.py)", README)
    }
    paths |= {
        f"src/haystack_integrations/common/multimodal_rag/{path}"
        for path in re.findall(r"(?<![\w/])((?:backends|inputs|numerics)/\w+\.py)", README)
    }
    assert len(paths) >= 20
    missing = sorted(path for path in paths if not (ROOT / path).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def _command_lines() -> Iterator[str]:
    """Lines of fenced shell blocks and inline spans that run a benchmark or `mmrag-eval`."""
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        yield from block.replace("\\\n", " ").splitlines()
    yield from _inline_code_spans(README)


def test_every_flag_the_readme_passes_to_a_script_exists() -> None:
    mmrag_eval = {option for action in build_parser()._actions for option in action.option_strings}
    checked = 0
    for line in _command_lines():
        flags = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line)
        script = re.search(r"benchmarks/(\w+\.py)", line)
        if script:
            source = (ROOT / "benchmarks" / script.group(1)).read_text(encoding="utf-8")
            known = set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", source))
        elif "mmrag-eval" in line:
            known = mmrag_eval
        else:
            continue
        unknown = [flag for flag in flags if flag not in known]
        assert not unknown, f"README `{line.strip()}` passes flags the script does not take: {unknown}"
        checked += len(flags)
    assert checked >= 8
