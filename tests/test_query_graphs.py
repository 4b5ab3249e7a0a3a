"""When the query encoder uses a CUDA graph (backends/query_graphs.py); the replay itself: tests/test_cuda_paths.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.backends.query_graphs import BUCKETS, QueryGraphs
from haystack_integrations.components.embedders.colpali import ColPaliTextEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker


def test_queries_are_padded_to_the_smallest_bucket_that_holds_them() -> None:
    assert QueryGraphs.bucket(1) == 32
    assert QueryGraphs.bucket(32) == 32
    assert QueryGraphs.bucket(33) == 64
    assert QueryGraphs.bucket(BUCKETS[-1]) == BUCKETS[-1]
    assert QueryGraphs.bucket(BUCKETS[-1] + 1) is None


def _never_called(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    raise AssertionError("no graph applies: the model must not be run here")


@pytest.mark.parametrize(
    "batch",
    [
        {"input_ids": torch.ones((2, 5), dtype=torch.long), "attention_mask": torch.ones((2, 5), dtype=torch.long)},
        {"input_ids": torch.ones((1, 5), dtype=torch.long)},  # no mask
        {
            "input_ids": torch.ones((1, 5), dtype=torch.long),
            "attention_mask": torch.ones((1, 5), dtype=torch.long),
            "pixel_values": torch.zeros((1, 5)),
        },
        {
            "input_ids": torch.ones((1, 5), dtype=torch.long),
            "attention_mask": torch.ones((1, 5), dtype=torch.long),
            "image_grid_thw": torch.ones((1, 3), dtype=torch.long),
        },
        {
            "input_ids": torch.ones((1, BUCKETS[-1] + 1), dtype=torch.long),
            "attention_mask": torch.ones((1, BUCKETS[-1] + 1), dtype=torch.long),
        },
    ],
    ids=["two queries", "no attention mask", "float input", "other shape", "longer than every bucket"],
)
def test_no_graph_for_what_it_cannot_replay(batch: dict[str, Any]) -> None:
    graphs = QueryGraphs(_never_called, device="cuda:0", pad_values={}, name="m")
    assert graphs.run(batch) is None
    assert graphs.replays == 0
    assert not graphs.disabled


def test_on_a_cpu_the_encoder_makes_no_graphs(tiny_colqwen2: str) -> None:
    encoder = LateInteractionEncoder.get(
        LoadSpec(model=tiny_colqwen2, component="t", device="cpu", token=None, local_files_only=True, model_kwargs=None)
    )
    with_graphs = encoder.embed_query_tensor("a chart", cuda_graphs=True)
    without = encoder.embed_query_tensor("a chart", cuda_graphs=False)
    torch.testing.assert_close(with_graphs, without, rtol=0, atol=0)
    assert encoder._query_graphs is None


def test_cuda_graphs_setting_round_trips_and_reaches_the_encoder(
    tiny_colqwen2: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for component_cls in (ColPaliTextEmbedder, ColPaliRanker):
        component = component_cls(tiny_colqwen2, cuda_graphs=False)
        data = component.to_dict()
        assert data["init_parameters"]["cuda_graphs"] is False
        assert component_cls.from_dict(data).cuda_graphs is False
        assert component_cls(tiny_colqwen2).cuda_graphs is True
    seen: list[bool] = []
    real = LateInteractionEncoder.embed_queries

    def spy(self: LateInteractionEncoder, texts: list[str], **kwargs: Any) -> Any:
        seen.append(kwargs["cuda_graphs"])
        return real(self, texts, **kwargs)

    monkeypatch.setattr(LateInteractionEncoder, "embed_queries", spy)
    ColPaliTextEmbedder(tiny_colqwen2, cuda_graphs=False).run(text="q")
    ColPaliTextEmbedder(tiny_colqwen2).run(text="q")
    assert seen == [False, True]
