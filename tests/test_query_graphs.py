"""When the query encoder uses a CUDA graph (backends/query_graphs.py); the replay itself: tests/test_cuda_paths.py."""

from __future__ import annotations

import threading
import time
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
        # Padded by its processor: the replay would return the padding's rows with the query's.
        {"input_ids": torch.ones((1, 5), dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])},
    ],
    ids=["two queries", "no attention mask", "float input", "other shape", "longer than every bucket", "padded"],
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


def test_two_threads_first_queries_share_one_set_of_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two components on one cached encoder, first queries at the same time: each thread made its own QueryGraphs,
    # and the one assigned last replaced the other (whose captures were lost, and which could capture meanwhile).
    from haystack_integrations.common.multimodal_rag.backends import colpali

    made: list[object] = []

    class SlowGraphs:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.05)  # the other thread reaches the same check meanwhile
            made.append(self)

        def run(self, batch: Any) -> None:
            return None

    monkeypatch.setattr(colpali, "QueryGraphs", SlowGraphs)
    encoder = object.__new__(LateInteractionEncoder)
    encoder.device = "cuda:0"
    encoder.family = colpali.ColPaliFamily("ColQwen2", "ColQwen2Processor", "qwen2_vl")
    encoder.processor = type("P", (), {"tokenizer": type("T", (), {"pad_token_id": 0})()})()
    encoder.model_id = "m"
    encoder._query_graphs = None
    start = threading.Barrier(2)

    def first_query() -> None:
        start.wait()
        encoder._graph_query({}, True)

    threads = [threading.Thread(target=first_query) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1
    assert encoder._query_graphs is made[0]
