"""The VLM components on the real checkpoints, when they are in the local Hugging Face cache (skipped otherwise).

Nothing is downloaded: run `huggingface-cli download lightonai/MonoQwen2-VL-v0.1` and
`huggingface-cli download Qwen/Qwen2-VL-2B-Instruct` once, then
`pytest integration_tests/test_real_vlm_checkpoints.py`. Token ids are the Qwen2 vocabulary's (the ranks in
Qwen's `qwen.tiktoken`, which Qwen2 and Qwen2-VL reuse; third-party Qwen2.5 and Qwen3-Reranker code agrees):
True 2514, False 4049, yes 9693, Yes 9454, YES 14004, no 2152, No 2753, NO 8996.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from haystack import Document
from PIL import Image, ImageDraw, ImageFont

from haystack_integrations.components.rankers.vlm import VisionLanguageRanker

MONOQWEN = "lightonai/MonoQwen2-VL-v0.1"
QWEN2_VL = "Qwen/Qwen2-VL-2B-Instruct"


def _cached(repo: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, local_files_only=True)
    except Exception:
        return False
    return True


needs_models = pytest.mark.skipif(
    not (_cached(MONOQWEN) and _cached(QWEN2_VL)),
    reason=f"{MONOQWEN} and {QWEN2_VL} are not in the local Hugging Face cache (nothing is downloaded by tests)",
)


def _slide(path: Path, lines: list[str]) -> Path:
    image = Image.new("RGB", (1024, 768), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=64)
    for i, line in enumerate(lines):
        draw.text((60, 80 + 110 * i), line, fill="black", font=font)
    image.save(path)
    return path


@needs_models
def test_monoqwen_reads_true_false_and_prefers_the_relevant_slide(tmp_path: Path) -> None:
    ranker = VisionLanguageRanker(local_files_only=True, batch_size=2)
    ranker.warm_up()
    assert ranker._answer_ids == ([2514], [4049])
    relevant = _slide(tmp_path / "revenue.png", ["Quarterly revenue", "Q1 12M  Q2 15M", "Q3 19M  Q4 23M"])
    other = _slide(tmp_path / "cats.png", ["Adopt a kitten", "Shelter opening hours", "Mon-Fri 9-17"])
    docs = [
        Document(id="revenue", meta={"file_path": str(relevant)}),
        Document(id="cats", meta={"file_path": str(other)}),
    ]
    out = ranker.run(query="What was the revenue in the fourth quarter?", documents=docs)["documents"]
    assert out[0].id == "revenue"
    assert out[0].score > out[1].score


@needs_models
def test_zero_shot_qwen2_vl_sums_the_real_case_variants() -> None:
    ranker = VisionLanguageRanker(QWEN2_VL, recipe="zero_shot_yes_no", local_files_only=True)
    ranker.warm_up()
    assert ranker._answer_ids == ([9693, 9454, 14004], [2152, 2753, 8996])
    assert ranker._vlm.processor.image_processor.size.longest_edge <= 1280 * 28 * 28
