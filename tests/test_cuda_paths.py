"""The GPU-only code paths run on a real CUDA device (skipped without one; CI has none).

Elsewhere these paths run on CPU tensors through the same code. Here they run where they were written for: the
device page cache's streams and events, hierarchical pooling's rounds on CUDA, and the ranker's staged scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from haystack.utils import ComponentDevice

from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.backends.query_graphs import QueryGraphs
from haystack_integrations.common.multimodal_rag.numerics.pooling import pool_tensors, ward_labels
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore, SQLiteMultiVectorStore
from haystack_integrations.testing.multimodal_rag.tiny_colpali import FAMILIES
from tests.colpali_fixtures import check_kept_until_the_store_changes
from tests.colpali_fixtures import embed_pages as _embed_pages
from tests.colpali_fixtures import page_docs as _page_docs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="runs on a CUDA device only")

CPU = ComponentDevice.from_str("cpu")
GPU = ComponentDevice.from_str("cuda:0")


def _clustered_pages(seed: int, sizes: list[int], dim: int = 128) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(24, dim, generator=generator), dim=-1)
    return [
        torch.nn.functional.normalize(
            centres[torch.randint(0, 24, (n,), generator=generator)] + 0.3 * torch.randn(n, dim, generator=generator),
            dim=-1,
        )
        for n in sizes
    ]


def _partition(labels: torch.Tensor) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for index, label in enumerate(labels.tolist()):
        groups.setdefault(label, set()).add(index)
    return {frozenset(group) for group in groups.values()}


def test_ward_clusters_on_cuda_equal_those_on_the_cpu() -> None:
    pages = _clustered_pages(0, [768, 500, 37, 2, 768])
    n_clusters = [max(p.shape[0] // 3, 1) for p in pages]
    on_cpu = ward_labels(pages, n_clusters)
    on_gpu = ward_labels([p.cuda() for p in pages], n_clusters)
    for cpu_labels, gpu_labels, k in zip(on_cpu, on_gpu, n_clusters, strict=True):
        assert gpu_labels.device.type == "cuda"
        assert _partition(gpu_labels.cpu()) == _partition(cpu_labels)
        assert int(gpu_labels.max()) + 1 == k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pooling_on_cuda_keeps_dtype_device_and_the_cpu_result(dtype: torch.dtype) -> None:
    pages = _clustered_pages(1, [768, 300, 1])
    pages.append(torch.full((10, 128), float("nan")))  # passed on unpooled
    on_gpu = pool_tensors([p.to("cuda", dtype) for p in pages], 3)
    on_cpu = pool_tensors([p.to(dtype) for p in pages], 3)
    for got, want, page in zip(on_gpu, on_cpu, pages, strict=True):
        assert got.device.type == "cuda"
        assert got.dtype == dtype
        pooled = page.shape[0] >= 2 and bool(torch.isfinite(page).all())
        assert got.shape == want.shape == ((max(page.shape[0] // 3, 1) if pooled else page.shape[0]), 128)
    # Pooled vectors come in the same order (by each cluster's first token); bf16 rounding of the inputs may move a
    # near-tie, so compare the MaxSim of a query against each page rather than vector by vector.
    query = torch.nn.functional.normalize(torch.randn(20, 128, generator=torch.Generator().manual_seed(2)), dim=-1)
    for got, want in zip(on_gpu[:3], on_cpu[:3], strict=True):
        gpu_score = float((query @ got.float().cpu().T).max(dim=1).values.sum())
        cpu_score = float((query @ want.float().T).max(dim=1).values.sum())
        assert gpu_score == pytest.approx(cpu_score, rel=2e-2 if dtype != torch.float32 else 1e-4)
    assert torch.isnan(on_gpu[3]).all()


def test_the_ranker_on_cuda_scores_like_the_cpu_and_keeps_pages_on_the_device_until_the_store_changes(
    tiny_colqwen2: str, pages_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "mv.sqlite")
    store = SQLiteMultiVectorStore(path)
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store, device=CPU)["documents"]
    on_cpu = ColPaliRanker(tiny_colqwen2, multivector_store=store, device=CPU).run(query="chart", documents=docs)[
        "documents"
    ]
    # The GPU encodes the query in bf16 (the CUDA default): its scores agree with the CPU's to bf16 precision (close
    # pages of a random tiny model may swap), and exactly with the same GPU ranker without the cache.
    expected = ColPaliRanker(tiny_colqwen2, multivector_store=store, device=GPU, device_cache_mb=0).run(
        query="chart", documents=docs
    )["documents"]
    cpu_scores = {d.id: d.score for d in on_cpu}
    assert [cpu_scores[d.id] for d in expected] == pytest.approx([d.score for d in expected], rel=3e-2)
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store, device=GPU)
    check_kept_until_the_store_changes(ranker, path, docs, expected, monkeypatch)


def test_a_cache_smaller_than_the_candidates_still_scores_every_page_on_cuda(
    tiny_colqwen2: str, pages_dir: Path
) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store, device=CPU)["documents"]
    rng = np.random.default_rng(0)
    dim = next(iter(store.get([docs[0].id]).values())).shape[1]
    extra = {f"x{i}": rng.standard_normal((40, dim)).astype(np.float16) for i in range(300)}
    store.write(extra)
    from haystack import Document

    candidates = [*docs, *(Document(id=i, meta={"modality": "page"}) for i in extra)]
    reference = ColPaliRanker(tiny_colqwen2, multivector_store=store, device=GPU, device_cache_mb=0, top_k=None)
    tiny = ColPaliRanker(tiny_colqwen2, multivector_store=store, device=GPU, device_cache_mb=1, top_k=None)
    want = {d.id: d.score for d in reference.run(query="chart", documents=candidates)["documents"]}
    for _ in range(3):  # cold, then with evictions
        got = {d.id: d.score for d in tiny.run(query="chart", documents=candidates)["documents"]}
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_query_replayed_from_a_cuda_graph_equals_the_plain_forward(
    family: str, tiny_colpali_family: Callable[[str], str]
) -> None:
    model = tiny_colpali_family(family)
    spec = LoadSpec(
        model=model,
        component="test",
        device="cuda:0",
        token=None,
        local_files_only=True,
        model_kwargs={"dtype": "float32"},  # tight comparison; the bf16 default differs by rounding only
    )
    encoder = LateInteractionEncoder.get(spec)
    queries = ["a bar chart", "which quarter had the highest revenue in the EMEA region " * 3]
    for query in queries:
        plain = encoder.embed_query_tensor(query, cuda_graphs=False)
        for _ in range(2):  # captured, then replayed
            replayed = encoder.embed_query_tensor(query)
            assert replayed.shape == plain.shape
            torch.testing.assert_close(replayed, plain, rtol=1e-4, atol=1e-4)
        host = encoder.embed_queries([query])[0]
        np.testing.assert_allclose(host, plain.float().cpu().numpy(), rtol=1e-4, atol=1e-4)
    graphs = encoder._query_graphs
    if family == "ColPali":  # padding moves its query vectors (backends/colpali.py `_NO_QUERY_GRAPHS`)
        assert graphs is None
        return
    assert graphs is not None
    assert not graphs.disabled, f"{family}: the query forward could not be captured"
    assert graphs.replays == 3 * len(queries)
    assert len(graphs._graphs) == len(
        {QueryGraphs.bucket(len(encoder.query_inputs([q])["input_ids"][0])) for q in queries}
    )


def test_a_forward_whose_padding_leaks_into_the_query_is_not_replayed(caplog: pytest.LogCaptureFixture) -> None:
    table = torch.randn(100, 8, device="cuda")

    def leaky(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = table[inputs["input_ids"]]  # (1, length, 8)
        return rows + rows.mean(dim=1, keepdim=True)  # every row sees the padding: not what a masked model does

    graphs = QueryGraphs(leaky, device="cuda:0", pad_values={"input_ids": 0}, name="leaky-model")
    batch = {"input_ids": torch.arange(1, 6)[None], "attention_mask": torch.ones((1, 5), dtype=torch.long)}
    assert graphs.run(batch) is None
    assert graphs.disabled
    assert "padding changes this model's query vectors" in caplog.text
    assert graphs.run(batch) is None  # and it does not try again


def test_a_forward_that_cannot_be_captured_is_run_without_a_graph(caplog: pytest.LogCaptureFixture) -> None:
    def syncing(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if bool(inputs["attention_mask"].all()):  # a host sync: forbidden while capturing
            return inputs["input_ids"][..., None].float()
        return inputs["input_ids"][..., None].float() * 2

    graphs = QueryGraphs(syncing, device="cuda:0", pad_values={}, name="syncing-model")
    batch = {"input_ids": torch.arange(1, 6)[None], "attention_mask": torch.ones((1, 5), dtype=torch.long)}
    assert graphs.run(batch) is None
    assert graphs.disabled
    assert "cannot be captured as a CUDA graph" in caplog.text
    # The device is usable afterwards, and this thread's work runs on its own stream again (torch.cuda.graph's
    # __exit__ raises before restoring it when the capture failed).
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert float(torch.ones(3, device="cuda").sum()) == 3.0
    # torch leaves the default CUDA generator marked as capturing after a failed capture: every random op then
    # raised "Offset increment outside graph capture encountered unexpectedly" (the next test's torch.randn, on an
    # H100 with torch 2.11) until query_graphs reset it.
    assert torch.randn(4, device="cuda").isfinite().all()
    torch.nn.functional.dropout(torch.ones(8, device="cuda"), p=0.5, training=True)


def test_padding_that_leaks_is_caught_also_when_the_first_query_fills_its_bucket() -> None:
    table = torch.randn(100, 8, device="cuda")
    table[0] = 10.0  # the padding token: its rows dominate any row that sees them

    def leaky(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = table[inputs["input_ids"]]
        return rows + rows.mean(dim=1, keepdim=True)

    graphs = QueryGraphs(leaky, device="cuda:0", pad_values={"input_ids": 0}, name="leaky-model")
    full = {"input_ids": torch.arange(1, 33)[None], "attention_mask": torch.ones((1, 32), dtype=torch.long)}
    assert graphs.run(full) is None  # 32 tokens pad nothing: the query alone could not show the leak
    assert graphs.disabled


def _toy_forward(seed: int, device: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    table = torch.randn(100, 16, device=device, generator=torch.Generator(device).manual_seed(seed))

    def forward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = table[inputs["input_ids"]] * inputs["attention_mask"][..., None]
        for _ in range(200):  # many small kernels: a capture that takes a while
            rows = torch.tanh(rows) + 0.5 * rows
        return rows

    return forward


def test_two_models_capture_from_two_threads_at_once() -> None:
    # torch.cuda.graph allows one capture at a time in a process (and, without a stream, captures on one shared
    # stream): two encoders' first queries in two threads must both get working graphs.
    import threading

    forwards = [_toy_forward(seed, "cuda:0") for seed in (1, 2)]
    graphs = [
        QueryGraphs(f, device="cuda:0", pad_values={"input_ids": 0}, name=f"m{i}") for i, f in enumerate(forwards)
    ]
    batch = {"input_ids": torch.arange(1, 11)[None], "attention_mask": torch.ones((1, 10), dtype=torch.long)}
    start = threading.Barrier(2)
    results: dict[int, torch.Tensor | None] = {}

    def first_query(i: int) -> None:
        start.wait()
        results[i] = graphs[i].run(batch)

    threads = [threading.Thread(target=first_query, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, forward in enumerate(forwards):
        assert not graphs[i].disabled
        replayed = results[i]
        assert replayed is not None
        torch.testing.assert_close(replayed, forward({k: v.cuda() for k, v in batch.items()})[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_model_on_another_gpu_than_the_current_one_replays_each_querys_rows() -> None:
    # Without a capture stream on the model's device, the forward ran instead of being captured: an empty graph,
    # and every later query of the bucket got the first query's rows.
    forward = _toy_forward(3, "cuda:1")
    graphs = QueryGraphs(forward, device="cuda:1", pad_values={"input_ids": 0}, name="m")
    assert torch.cuda.current_device() == 0
    for ids in (torch.arange(1, 11), torch.arange(20, 27)):
        batch = {"input_ids": ids[None], "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}
        replayed = graphs.run(batch)
        assert replayed is not None
        torch.testing.assert_close(replayed, forward({k: v.to("cuda:1") for k, v in batch.items()})[0])


def test_a_downscale_the_gpu_resize_refuses_is_preprocessed_on_the_host(
    tiny_siglip: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Seen on an H100 in the tiny quickstart: torch's antialiased CUDA resize raises "Too much shared memory
    # required" for large downscale factors; the batch must still embed, as the host processor does it.
    from PIL import Image

    from haystack_integrations.common.multimodal_rag.backends.dense import DenseEncoder

    encoder = DenseEncoder.get(
        LoadSpec(
            model=tiny_siglip, component="t", device="cuda:0", token=None, local_files_only=True, model_kwargs=None
        )
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (2400, 3200, 3), dtype=np.uint8))]
    inputs = encoder.image_inputs(images)
    torch.cuda.synchronize()
    on_host = encoder.image_processor(images=images, return_tensors="pt")
    for key, value in on_host.items():
        got = inputs[key].cpu().float()
        assert got.shape == value.shape
        assert float((got - value.float()).abs().max()) <= 4 * 2 / 255  # host result, or the GPU's within rounding
    vectors = encoder.embed_image_inputs(inputs, normalize=True)
    assert vectors.shape[0] == 1
    assert np.isfinite(vectors).all()


@pytest.mark.parametrize("cat_runs", [0, 16], ids=["index_select", "cat"])
def test_cached_pages_gathered_on_cuda_are_the_stored_rows_and_score_on_another_stream(
    cat_runs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hits gathered as a view of one block, a few runs, and many runs (index_select on the device), then scored on
    # a side stream: `ready` must order the scoring after the uploads and the copy.
    from haystack_integrations.common.multimodal_rag.numerics import page_cache
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_staged
    from haystack_integrations.testing.multimodal_rag.reference import maxsim_reference

    monkeypatch.setattr(page_cache, "_CAT_RUNS", cat_runs)  # 0: every multi-run gather takes the index path
    rng = np.random.default_rng(5)
    ids = [f"p{i:02d}" for i in range(60)]
    store = InMemoryMultiVectorStore()
    store.write({doc_id: rng.standard_normal((1 + i % 9, 128)).astype(np.float32) for i, doc_id in enumerate(ids)})
    cache = page_cache.DevicePageCache(1 << 24)
    device = torch.device("cuda", 0)
    for upload in (ids[:20], ids[20:40], ids[40:]):
        cache.stage(store, upload, device)
    query = torch.randn(8, 128, generator=torch.Generator().manual_seed(6))
    side = torch.cuda.Stream(device)
    for wanted in (ids[20:40], list(reversed(ids)), [doc_id for i, doc_id in enumerate(ids) if i % 3]):
        found, parts = cache.stage(store, wanted, device)
        assert sorted(found) == sorted(wanted)
        assert len(parts) == 1  # every page was cached
        part = parts[0]
        assert part.packed.device.type == "cuda"
        assert part.ready is not None
        assert part.device_lengths.tolist() == list(part.lengths)
        with torch.cuda.stream(side):
            scores = maxsim_staged(query, part)
        side.synchronize()
        stored = store.get(found)
        rows = part.packed.float().cpu().numpy()
        start = 0
        for doc_id, length in zip(found, part.lengths, strict=True):
            np.testing.assert_array_equal(rows[start : start + length], stored[doc_id].astype(np.float32))
            start += length
        expected = maxsim_reference(query.numpy(), [stored[doc_id].astype(np.float32) for doc_id in found])
        np.testing.assert_allclose(scores.cpu().numpy(), expected, rtol=1e-3, atol=1e-3)
        if wanted == ids[20:40]:  # one whole block: a view of it, no copy
            assert part.packed.data_ptr() == cache._entries["p20"].block.packed.data_ptr()


def test_batches_queued_without_waiting_give_the_synchronous_embeddings(tiny_siglip: str) -> None:
    from PIL import Image

    from haystack_integrations.common.multimodal_rag.backends.dense import DenseEncoder

    encoder = DenseEncoder.get(
        LoadSpec(
            model=tiny_siglip, component="t", device="cuda:0", token=None, local_files_only=True, model_kwargs=None
        )
    )
    rng = np.random.default_rng(1)
    batches = [
        [Image.fromarray(rng.integers(0, 255, (60 + 4 * i, 80, 3), dtype=np.uint8)) for i in range(b, b + 3)]
        for b in range(0, 9, 3)
    ]
    expected = [encoder.embed_image_inputs(encoder.image_inputs(images), normalize=True) for images in batches]
    pending = [encoder.start_embedding(encoder.image_inputs(images), normalize=True) for images in batches]
    for want, queued in zip(expected, pending, strict=True):
        np.testing.assert_array_equal(queued.result(), want)
        np.testing.assert_array_equal(queued.result(), want)  # a second call returns the same array


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_queued_batches_of_a_model_on_another_gpu_than_the_current_one_are_complete(tiny_siglip: str) -> None:
    # The copy back is queued on cuda:1's stream: an event recorded on the current device's stream (cuda:0) let
    # `result()` read the page-locked buffer before the copy had filled it.
    from PIL import Image

    from haystack_integrations.common.multimodal_rag.backends.dense import DenseEncoder

    def encoder_on(device: str) -> DenseEncoder:
        spec = LoadSpec(
            model=tiny_siglip, component="test", device=device, token=None, local_files_only=True, model_kwargs=None
        )
        return DenseEncoder.get(spec)

    on_cpu, on_gpu1 = encoder_on("cpu"), encoder_on("cuda:1")
    assert torch.cuda.current_device() == 0
    rng = np.random.default_rng(2)
    batches = [[Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(8)] for _ in range(3)]
    pending = [on_gpu1.start_embedding(on_gpu1.image_inputs(images), normalize=True) for images in batches]
    for images, result in zip(batches, pending, strict=True):
        np.testing.assert_allclose(result.result(), on_cpu.embed_images(images, normalize=True), atol=5e-2)
