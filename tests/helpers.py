"""Shared test helpers: session-scoped tiny models and generated images/PDFs.

Registered as a pytest plugin by `tests/conftest.py`, so every fixture here is available to every
test file; test files import the plain helper functions from this module directly. No test touches
the network: models are tiny random-weight checkpoints written by
`haystack_integrations.testing.multimodal_rag.tiny_models` and loaded by path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

# Never reach the Hub from a test, even by accident (set before anything imports huggingface_hub).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from PIL import Image, ImageDraw

from haystack_integrations.testing.multimodal_rag import tiny_models

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def make_image(path: Path, *, size: tuple[int, int] = (48, 40), color: str = "red", fmt: str | None = None) -> Path:
    """Write a small image with a shape on it (so images differ in content, not only colour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(img)
    draw.rectangle(
        [size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill="white" if color != "white" else "black"
    )
    img.save(path, format=fmt)
    return path


def image_bytes(*, size: tuple[int, int] = (48, 40), color: str = "blue", fmt: str = "PNG") -> bytes:
    """Encode a small image to bytes."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def make_pdf(path: Path, *, pages: int = 3, size: tuple[int, int] = (60, 80)) -> Path:
    """Write a multi-page PDF (one coloured page per colour) with Pillow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", size, COLORS[i % len(COLORS)]) for i in range(pages)]
    images[0].save(path, format="PDF", save_all=True, append_images=images[1:])
    return path


def make_tiff(
    path: Path, *, colors: tuple[str, ...] = ("red", "green", "blue"), size: tuple[int, int] = (60, 80)
) -> Path:
    """Write a multi-page TIFF (one page per colour), as a scanner writes a multi-page scan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", size, color) for color in colors]
    images[0].save(path, format="TIFF", save_all=True, append_images=images[1:])
    return path


def make_corrupt_image(path: Path) -> Path:
    """A file with a PNG extension whose bytes are not an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a png at all" * 10)
    return path


def make_truncated_image(path: Path) -> Path:
    """A PNG whose header is valid but whose pixel data is cut off."""
    data = image_bytes(size=(64, 64), color="green")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def make_truncated_pdf(path: Path) -> Path:
    """A PDF cut in half (no cross-reference table, no trailer)."""
    full = make_pdf(path.with_name("full_" + path.name), pages=2)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temp folder for every tiny model of the test run."""
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_siglip(models_dir: Path) -> str:
    """Path of a tiny random SigLIP dual encoder."""
    return str(tiny_models.build_tiny_siglip(models_dir / "siglip"))


@pytest.fixture(scope="session")
def tiny_clip(models_dir: Path) -> str:
    """Path of a tiny random CLIP dual encoder."""
    return str(tiny_models.build_tiny_clip(models_dir / "clip"))


@pytest.fixture(scope="session")
def tiny_siglip2(models_dir: Path) -> str:
    """Path of a tiny random SigLIP 2 dual encoder."""
    return str(tiny_models.build_tiny_siglip2(models_dir / "siglip2"))


@pytest.fixture(scope="session", params=["siglip", "siglip2", "clip"])
def dual_encoder(request: pytest.FixtureRequest) -> str:
    """Each tiny dual-encoder family in turn."""
    return str(request.getfixturevalue(f"tiny_{request.param}"))


@pytest.fixture(scope="session")
def tiny_colqwen2(models_dir: Path) -> str:
    """Path of a tiny random ColQwen2 late-interaction model."""
    return str(tiny_models.build_tiny_qwen2_vl(models_dir / "colqwen2", kind="colpali", version="2"))


@pytest.fixture(scope="session")
def tiny_colqwen2_5(models_dir: Path) -> str:
    """Path of a tiny random ColQwen2.5 late-interaction model."""
    return str(tiny_models.build_tiny_qwen2_vl(models_dir / "colqwen2_5", kind="colpali", version="2.5"))


@pytest.fixture(scope="session")
def tiny_vlm(models_dir: Path) -> str:
    """Path of a tiny random Qwen2-VL image-text-to-text model."""
    return str(tiny_models.build_tiny_qwen2_vl(models_dir / "qwen2_vl", kind="vlm", version="2"))


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A folder with two images and a three-page PDF."""
    make_image(tmp_path / "red.png", color="red")
    make_image(tmp_path / "blue.jpg", color="blue", fmt="JPEG")
    make_pdf(tmp_path / "report.pdf", pages=3)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_device_means_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    In tests, a component given no device runs on the CPU, as on CI, also on a machine with a GPU.

    Most tests compare results with float32 references (colpali-engine's scorer, model cards' recipes), which a
    bfloat16 GPU run meets only to bf16 precision. The GPU paths have their own tests that name their device
    (tests/test_cuda_paths.py and the `skipif(not torch.cuda.is_available())` tests). `MMRAG_TEST_DEVICE=best`
    keeps the library's own choice (the best available device) for a run of the whole suite on a GPU.
    """
    if os.environ.get("MMRAG_TEST_DEVICE") == "best":
        return
    from haystack.utils import ComponentDevice

    from haystack_integrations.common.multimodal_rag.backends import loading

    def resolve(device: ComponentDevice | None) -> str:
        return "cpu" if device is None else ComponentDevice.resolve_device(device).to_torch_str()

    monkeypatch.setattr(loading, "resolve_device", resolve)
