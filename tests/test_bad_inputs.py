"""Bad inputs, components x attacks: every case handled (kept, or a failure that names the document and the reason).

Rules checked for every row (DESIGN.md, issue 12):
- pixels a model cannot take as they are (transparency, EXIF rotation, extreme aspect ratios) are normalised by
  the shared loader and the document goes through;
- any other bad input is a failure that names the document (id or file) and the reason, never a bare
  `TypeError` / `ValueError` / `OSError`;
- with `on_error="skip"` (and always for the prompt builder): inputs = outputs + failures;
- with `on_error="raise"`: one `DocumentProcessingError` / `ConversionError` naming the document, nothing written.

Add rows for other components at the bottom (one adapter per component, the attacks are shared).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pypdfium2 as pdfium
import pytest
from haystack import Document
from PIL import Image, ImageDraw

from haystack_integrations.common.multimodal_rag.errors import ConversionError, DocumentProcessingError
from haystack_integrations.common.multimodal_rag.inputs.planning import plan_documents
from haystack_integrations.components.builders.multimodal import MultimodalChatPromptBuilder
from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.components.embedders.multimodal import MultimodalDocumentEmbedder
from haystack_integrations.components.monitors.alignment_drift import AlignmentDriftMonitor
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.components.rankers.modality_calibration import ModalityScoreCalibrator
from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore
from tests.helpers import make_corrupt_image, make_image, make_pdf, make_truncated_image

# --- attacks: each writes what it needs under `root` and returns the meta of the attacking document ------------


def _transparent_png(root: Path) -> dict[str, Any]:
    chart = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    ImageDraw.Draw(chart).rectangle([10, 10, 30, 35], fill=(0, 0, 255, 255))
    chart.save(root / "transparent.png")
    return {"file_path": "transparent.png"}


def _exif_rotated_jpeg(root: Path) -> dict[str, Any]:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (80, 40), (200, 30, 30)).save(root / "rotated.jpg", exif=exif)
    return {"file_path": "rotated.jpg"}


def _wide_banner(root: Path) -> dict[str, Any]:
    Image.new("RGB", (1600, 6), (255, 0, 0)).save(root / "banner.png")  # 266:1, Qwen processors refuse > 200
    return {"file_path": "banner.png"}


def _tall_strip(root: Path) -> dict[str, Any]:
    Image.new("RGB", (6, 1600), (0, 255, 0)).save(root / "strip.png")
    return {"file_path": "strip.png"}


def _banner_pdf_page(root: Path) -> dict[str, Any]:
    make_pdf(root / "banner.pdf", pages=1, size=(1600, 6))
    return {"file_path": "banner.pdf", "page_number": 1, "modality": "page"}


def _zero_page_pdf(root: Path) -> dict[str, Any]:
    buffer = io.BytesIO()
    pdfium.PdfDocument.new().save(buffer)
    (root / "empty.pdf").write_bytes(buffer.getvalue())
    return {"file_path": "empty.pdf", "page_number": 1, "modality": "page"}


def _encrypted_pdf(root: Path) -> dict[str, Any]:
    pypdf = pytest.importorskip("pypdf")
    make_pdf(root / "plain.pdf", pages=1)
    writer = pypdf.PdfWriter()
    writer.append(str(root / "plain.pdf"))
    writer.encrypt("secret", algorithm="RC4-128")
    writer.write(str(root / "locked.pdf"))
    return {"file_path": "locked.pdf", "page_number": 1, "modality": "page"}


def _symlink_outside_root(root: Path) -> dict[str, Any]:
    outside = root.parent / f"{root.name}-outside"
    make_image(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    return {"file_path": "link.png"}


@dataclass(frozen=True)
class Attack:
    name: str
    make: Callable[[Path], dict[str, Any]]
    #: `None`: the document must go through; else a fragment of the failure reason.
    reason: str | None


ATTACKS = [
    Attack("transparent-png", _transparent_png, None),
    Attack("exif-rotated-jpeg", _exif_rotated_jpeg, None),
    Attack("banner-1600x6", _wide_banner, None),
    Attack("strip-6x1600", _tall_strip, None),
    Attack("banner-pdf-page", _banner_pdf_page, None),
    Attack("file-path-int", lambda root: {"file_path": 12345, "modality": "image"}, "must be a file path"),
    Attack("file-path-nul-byte", lambda root: {"file_path": "a\x00b.png"}, "NUL byte"),
    Attack("file-path-name-300-bytes", lambda root: {"file_path": "n" * 300 + ".png"}, "255-byte limit"),
    Attack("file-path-empty", lambda root: {"file_path": "", "modality": "image"}, "empty string"),
    Attack("file-path-list", lambda root: {"file_path": ["a.png"]}, "must be a file path"),
    Attack("missing-file", lambda root: {"file_path": "missing.png"}, "does not exist"),
    Attack("traversal", lambda root: {"file_path": "../../etc/hosts.png"}, "outside root_path"),
    Attack("symlink-outside-root", _symlink_outside_root, "outside root_path"),
    Attack("corrupt-png", lambda root: {"file_path": make_corrupt_image(root / "broken.png").name}, "cannot identify"),
    Attack("truncated-png", lambda root: {"file_path": make_truncated_image(root / "truncated.png").name}, "truncated"),
    Attack("zero-page-pdf", _zero_page_pdf, "no pages"),
    Attack("encrypted-pdf", _encrypted_pdf, "encrypted and needs a password"),
    Attack(
        "page-out-of-range",
        lambda root: {"file_path": make_pdf(root / "two.pdf", pages=2).name, "page_number": 9, "modality": "page"},
        "page_number 9 is beyond",
    ),
]


def _documents(root: Path, attack: Attack) -> list[Document]:
    root.mkdir(parents=True, exist_ok=True)
    make_image(root / "good.png", color="blue")
    return [
        Document(id="good", meta={"file_path": "good.png"}, score=0.5),
        Document(id="attack", meta=attack.make(root), score=0.9),
    ]


# --- components: each runs the documents and returns (ids that went through, {id: reason} of failures) ---------

Outcome = tuple[list[str], dict[str, str]]


def _run_planning(docs: list[Document], root: Path, _: Any) -> Outcome:
    plan = plan_documents(docs, file_path_meta_field="file_path", root_path=root)
    return [docs[i].id for i in range(len(docs)) if i not in plan.failures], {
        docs[i].id: reason for i, reason in plan.failures.items()
    }


def _run_prompt_builder(docs: list[Document], root: Path, _: Any) -> Outcome:
    out = MultimodalChatPromptBuilder(max_images=4, root_path=str(root)).run(query="q", documents=docs)
    shown = [image.meta["document_id"] for image in out["messages"][-1].images]
    skipped = {c["document_id"]: str(c["skipped_reason"]) for c in out["citations"] if not c["included"]}
    return shown, skipped


def _split(out: dict[str, list[Document]]) -> Outcome:
    return [d.id for d in out["documents"]], {d.id: d.meta["embedding_error"] for d in out["failed_documents"]}


def _run_dense_embedder(docs: list[Document], root: Path, models: dict[str, str]) -> Outcome:
    embedder = MultimodalDocumentEmbedder(
        models["siglip"], root_path=str(root), progress_bar=False, local_files_only=True, on_error="skip"
    )
    out = embedder.run(documents=docs)
    assert all(d.embedding is not None for d in out["documents"])
    return _split(out)


def _run_colpali_embedder(docs: list[Document], root: Path, models: dict[str, str]) -> Outcome:
    store = InMemoryMultiVectorStore()
    embedder = ColPaliDocumentEmbedder(
        models["colqwen2"],
        multivector_store=store,
        root_path=str(root),
        progress_bar=False,
        local_files_only=True,
        on_error="skip",
    )
    ids, failures = _split(embedder.run(documents=docs))
    assert sorted(store.get(ids)) == sorted(ids)  # written exactly for the documents that went through
    assert store.get(list(failures)) == {}
    return ids, failures


COMPONENTS: dict[str, Callable[[list[Document], Path, Any], Outcome]] = {
    "planning": _run_planning,
    "prompt_builder": _run_prompt_builder,
    "dense_embedder": _run_dense_embedder,
    "colpali_embedder": _run_colpali_embedder,
}


@pytest.fixture(scope="module")
def models(request: pytest.FixtureRequest) -> dict[str, str]:
    return {
        "siglip": request.getfixturevalue("tiny_siglip"),
        "colqwen2": request.getfixturevalue("tiny_colqwen2"),
    }


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
@pytest.mark.parametrize("component", list(COMPONENTS))
def test_component_handles_attack(
    component: str, attack: Attack, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    needs_model = component.endswith("embedder")
    models = request.getfixturevalue("models") if needs_model else None
    docs = _documents(tmp_path / "root", attack)
    through, failures = COMPONENTS[component](docs, tmp_path / "root", models)
    assert sorted(through + list(failures)) == sorted(d.id for d in docs)  # inputs = outputs + failures
    assert "good" in through
    if attack.reason is None:
        assert "attack" in through, failures.get("attack")
    else:
        assert "attack" in failures
        assert attack.reason in failures["attack"]


@pytest.mark.parametrize(
    "attack", [a for a in ATTACKS if a.reason is not None], ids=[a.name for a in ATTACKS if a.reason is not None]
)
def test_dense_embedder_raise_names_the_document_and_the_reason(
    attack: Attack, tmp_path: Path, tiny_siglip: str
) -> None:
    docs = _documents(tmp_path / "root", attack)
    embedder = MultimodalDocumentEmbedder(
        tiny_siglip, root_path=str(tmp_path / "root"), progress_bar=False, local_files_only=True
    )
    with pytest.raises(DocumentProcessingError) as info:
        embedder.run(documents=docs)
    assert info.value.failures[0][0] == "attack"
    assert attack.reason in info.value.failures[0][1]


# --- the converter: attacks on `sources` ------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceAttack:
    name: str
    make: Callable[[Path], Any]
    reason: str


SOURCE_ATTACKS = [
    SourceAttack("int", lambda root: 7, "must be a file path"),
    SourceAttack("empty-string", lambda root: "", "empty string"),
    SourceAttack("nul-byte", lambda root: "a\x00b.png", "NUL byte"),
    SourceAttack("name-300-bytes", lambda root: "n" * 300 + ".png", "255-byte limit"),
    SourceAttack("missing", lambda root: "missing.png", "does not exist"),
    SourceAttack("traversal", lambda root: "../outside.png", "outside root_path"),
    SourceAttack("named-symlink-outside", lambda root: _symlink_outside_root(root)["file_path"], "outside root_path"),
    SourceAttack("zero-page-pdf", lambda root: _zero_page_pdf(root)["file_path"], "no pages"),
    SourceAttack("encrypted-pdf", lambda root: _encrypted_pdf(root)["file_path"], "encrypted"),
    SourceAttack("unsupported-type", lambda root: _write(root / "x.docx", b"PK"), "unsupported file type"),
    SourceAttack("empty-text-file", lambda root: _write(root / "empty.txt", b"  \n"), "is empty"),
    SourceAttack("undecodable-text", lambda root: _write(root / "latin.txt", b"caf\xe9 \xff"), "cannot read"),
]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.name


@pytest.mark.parametrize("attack", SOURCE_ATTACKS, ids=[a.name for a in SOURCE_ATTACKS])
def test_converter_names_every_bad_source(attack: SourceAttack, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    make_image(root / "good.png")
    bad = attack.make(root)
    sources = ["good.png", bad]
    out = MultimodalFileToDocument(root_path=str(root), on_error="skip").run(sources=sources)
    assert [d.meta["file_path"] for d in out["documents"]] == ["good.png"]
    assert len(out["failed_sources"]) == 1
    assert attack.reason in out["failed_sources"][0]["reason"]
    with pytest.raises(ConversionError, match="1 source"):
        MultimodalFileToDocument(root_path=str(root)).run(sources=sources)


@pytest.mark.parametrize("sources", [".", "/", Path("."), b"."], ids=["str-dot", "str-root", "path", "bytes"])
def test_converter_refuses_sources_that_are_not_a_list(sources: Any, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sources must be a list"):
        MultimodalFileToDocument(root_path=str(tmp_path)).run(sources=sources)


# --- the same pixels reach every model: a normalised file embeds exactly like its hand-normalised twin ----------


def _pixel_twins(root: Path) -> dict[str, tuple[str, str, str]]:
    """(attacking file, the same picture as the loader should see it, the picture a bare convert('RGB') gives)."""
    root.mkdir(parents=True, exist_ok=True)
    chart = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    ImageDraw.Draw(chart).rectangle([10, 10, 30, 35], fill=(0, 0, 255, 255))
    chart.save(root / "transparent.png")
    on_white = Image.new("RGB", chart.size, (255, 255, 255))
    on_white.paste(chart, mask=chart.getchannel("A"))
    on_white.save(root / "transparent_on_white.png")
    chart.convert("RGB").save(root / "transparent_on_black.png")

    upright = Image.new("RGB", (40, 80), (0, 0, 255))
    ImageDraw.Draw(upright).rectangle([0, 0, 39, 19], fill=(255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(root / "rotated.png", exif=exif)
    upright.save(root / "upright.png")
    upright.transpose(Image.Transpose.ROTATE_90).save(root / "sideways.png")
    return {
        "transparency": ("transparent.png", "transparent_on_white.png", "transparent_on_black.png"),
        "exif": ("rotated.png", "upright.png", "sideways.png"),
    }


@pytest.mark.parametrize("case", ["transparency", "exif"])
@pytest.mark.parametrize("component", ["dense_embedder", "colpali_embedder", "colpali_ranker", "prompt_builder"])
def test_every_pixel_reader_sees_the_normalised_image(
    component: str, case: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    attacking, expected, naive = _pixel_twins(tmp_path)[case]
    docs = [Document(id=name, meta={"file_path": name}, score=1.0) for name in (attacking, expected, naive)]
    if component == "prompt_builder":
        out = MultimodalChatPromptBuilder(root_path=str(tmp_path)).run(query="q", documents=docs)
        seen = {i.meta["document_id"]: i.base64_image for i in out["messages"][-1].images}
    elif component == "colpali_ranker":
        # No stored vectors: the ranker encodes the pages itself, through the same loader.
        ranker = ColPaliRanker(
            request.getfixturevalue("tiny_colqwen2"), top_k=3, root_path=str(tmp_path), local_files_only=True
        )
        ranked = ranker.run(query="blue bar chart", documents=docs)["documents"]
        seen = {d.id: d.meta["late_interaction_score"] for d in ranked}
    elif component == "dense_embedder":
        embedder = MultimodalDocumentEmbedder(
            request.getfixturevalue("tiny_siglip"), root_path=str(tmp_path), progress_bar=False, local_files_only=True
        )
        seen = {d.id: d.embedding for d in embedder.run(documents=docs)["documents"]}
    else:
        store = InMemoryMultiVectorStore(dtype="float32")
        ColPaliDocumentEmbedder(
            request.getfixturevalue("tiny_colqwen2"),
            multivector_store=store,
            root_path=str(tmp_path),
            progress_bar=False,
            local_files_only=True,
        ).run(documents=docs)
        seen = {k: v.tolist() for k, v in store.get([attacking, expected, naive]).items()}
    assert seen[attacking] == seen[expected]
    assert seen[attacking] != seen[naive]


def test_colpali_ranker_ranks_a_banner_it_encodes_itself(tmp_path: Path, tiny_colqwen2: str) -> None:
    docs = _documents(tmp_path, ATTACKS[2])  # the 1600x6 banner, which Qwen2-VL processors refuse as it is
    ranked = ColPaliRanker(tiny_colqwen2, top_k=2, root_path=str(tmp_path), local_files_only=True).run(
        query="a red banner", documents=docs
    )["documents"]
    assert sorted(d.id for d in ranked) == ["attack", "good"]


_DOCUMENT_CONSUMERS: dict[str, Callable[[Any], Any]] = {
    "MultimodalDocumentEmbedder": lambda docs: MultimodalDocumentEmbedder("/no/such/model").run(docs),
    "ColPaliDocumentEmbedder": lambda docs: ColPaliDocumentEmbedder(
        "/no/such/model", multivector_store=InMemoryMultiVectorStore()
    ).run(docs),
    "ColPaliRanker": lambda docs: ColPaliRanker("/no/such/model", multivector_store=InMemoryMultiVectorStore()).run(
        "q", documents=docs
    ),
    "VisionLanguageRanker": lambda docs: VisionLanguageRanker("/no/such/model").run("q", docs),
    "ModalityScoreCalibrator": lambda docs: ModalityScoreCalibrator().run(docs, query="q"),
    "AlignmentDriftMonitor": lambda docs: AlignmentDriftMonitor().run(docs),
    "MultimodalChatPromptBuilder": lambda docs: MultimodalChatPromptBuilder().run("q", docs),
}


@pytest.mark.parametrize(
    ("given", "got", "hint"),
    [
        (["data/chart.png"], "a list holding a str ('data/chart.png')", "Document(meta={'file_path': path})"),
        ([Path("chart.png")], "a list holding a PosixPath", "MultimodalFileToDocument"),
        ("chart.png", "a str ('chart.png')", "Document(meta={'file_path': path})"),
        (Document(content="x", score=1.0), "a Document", "Wrap a single Document in a list"),
        (None, "a NoneType (None)", ""),
    ],
    ids=["list-of-str", "list-of-path", "str", "one-document", "none"],
)
@pytest.mark.parametrize("component", list(_DOCUMENT_CONSUMERS))
def test_a_component_given_something_else_than_documents_says_what_it_got_and_what_to_pass(
    component: str, given: Any, got: str, hint: str
) -> None:
    # Before: the rankers, calibrator, monitor and prompt builder failed deep inside with
    # "AttributeError: 'str' object has no attribute 'meta'".
    with pytest.raises(TypeError) as info:
        _DOCUMENT_CONSUMERS[component](given)
    message = str(info.value)
    assert message.startswith(f"{component} expects a list of Documents as input, got {got}")
    assert hint in message
    # A bare string may be a query text; a list of file paths is not (CHANGELOG: no text-embedder hint for those).
    assert ("To embed a query text" in message) == (isinstance(given, str) and "Embedder" in component)


@pytest.mark.parametrize(
    "component",
    [
        "ColPaliRanker",
        "VisionLanguageRanker",
        "ModalityScoreCalibrator",
        "AlignmentDriftMonitor",
        "MultimodalChatPromptBuilder",
    ],
)
def test_the_components_that_took_a_tuple_of_documents_still_take_one(component: str) -> None:
    # These iterated any sequence before they checked their input; a caller passing a tuple must keep working
    # (the document embedders refused tuples before and still do).
    _DOCUMENT_CONSUMERS[component](())
    if "Ranker" not in component:  # the rankers would load their (missing) model for a non-empty input
        _DOCUMENT_CONSUMERS[component]((Document(content="a text", score=0.5, meta={"modality": "text"}),))
    with pytest.raises(TypeError, match=rf"^{component} expects a list of Documents as input, got a tuple holding"):
        _DOCUMENT_CONSUMERS[component]((Document(content="x"), "chart.png"))
