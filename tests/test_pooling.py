"""Hierarchical token pooling (numerics/pooling.py) against colpali-engine's pooler and scipy's Ward linkage."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from haystack_integrations.common.multimodal_rag.numerics.pooling import pool_multivectors, pool_tensors, ward_labels
from haystack_integrations.testing.multimodal_rag.reference import maxsim_reference


def _partition(labels: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(tuple(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels))


def _unit(generator: torch.Generator, n: int, dim: int = 128) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)


def _topical(generator: torch.Generator, n: int, topics: int = 24) -> torch.Tensor:
    """Vectors scattered around a few topics, as the vectors of a real page cluster around its content."""
    centres = _unit(generator, topics)
    rows = centres[torch.randint(0, topics, (n,), generator=generator)] + 0.3 * torch.randn(n, 128, generator=generator)
    return torch.nn.functional.normalize(rows, dim=-1)


T = TypeVar("T")


def _host_syncs(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], T]) -> tuple[T, int]:
    """`fn()` and how many times it copied a tensor to the host with `tolist` (the pooling rounds' one sync)."""
    calls = 0
    original = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> object:
        nonlocal calls
        calls += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    try:
        return fn(), calls
    finally:
        monkeypatch.undo()


def _scipy_partition(page: torch.Tensor, k: int) -> list[tuple[int, ...]]:
    """colpali-engine's recipe: the rows of `1 - E Eᵀ` as observations, Ward linkage, maxclust cut."""
    e = page.double().numpy()
    tree = linkage(1.0 - e @ e.T, metric="euclidean", method="ward")
    return _partition(fcluster(tree, t=k, criterion="maxclust"))


def test_pooling_keeps_colpali_engine_clusters_and_vectors_on_random_pages() -> None:
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    pooler = HierarchicalTokenPooler()
    generator = torch.Generator().manual_seed(0)
    for pool_factor, sizes in ((2, (40, 37)), (3, (120, 101, 64)), (4, (257,))):
        pages = [_unit(generator, n) for n in sizes]
        ours = pool_tensors(pages, pool_factor)  # all pages of a batch at once, padded
        labels = ward_labels(pages, [max(n // pool_factor, 1) for n in sizes])
        for page, pooled, our_labels in zip(pages, ours, labels, strict=True):
            reference, clusters = pooler._pool_single_embedding(page, pool_factor)
            reference_partition = sorted(tuple(ix[0].tolist()) for ix in clusters.values() if ix[0].numel())
            assert _partition(our_labels.numpy()) == reference_partition
            assert pooled.shape == reference.shape
            # Same vectors; only their order may differ (MaxSim does not depend on it).
            np.testing.assert_allclose(np.sort(pooled.numpy(), axis=0), np.sort(reference.numpy(), axis=0), atol=1e-6)
            query = _unit(generator, 12)
            assert maxsim_reference(query, [pooled])[0] == pytest.approx(maxsim_reference(query, [reference])[0])


def test_full_size_topical_pages_of_different_lengths_get_colpali_engines_clusters() -> None:
    # The trained ColQwen2.5 budget (768 visual tokens) and shorter pages in ONE batch: padding and the compaction
    # of finished clusters between rounds must not mix pages.
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    pooler = HierarchicalTokenPooler()
    generator = torch.Generator().manual_seed(3)
    pages = [_topical(generator, 768), _unit(generator, 755), _topical(generator, 300)]
    labels = ward_labels(pages, [n // 3 for n in (768, 755, 300)])
    for page, our_labels in zip(pages, labels, strict=True):
        _, clusters = pooler._pool_single_embedding(page, 3)
        assert _partition(our_labels.numpy()) == sorted(
            tuple(ix[0].tolist()) for ix in clusters.values() if ix[0].numel()
        )


@pytest.mark.parametrize("k", [1, 2, 7, 30, 60, 99, 100])
def test_every_cut_of_the_tree_matches_scipys_sequential_ward(k: int) -> None:
    # The rounds stop as soon as the `n - k` lowest merges are known: cuts near the top of the tree (k = 1, 2),
    # in the middle and at the leaves (k = n: no merge) must all agree with scipy's one-merge-at-a-time linkage.
    page = _topical(torch.Generator().manual_seed(k), 100)
    assert _partition(ward_labels([page], [k])[0].numpy()) == _scipy_partition(page, k)


def test_labels_are_numbered_by_each_clusters_first_vector() -> None:
    page = _unit(torch.Generator().manual_seed(5), 50)
    labels = ward_labels([page], [10])[0]
    first_of_each = [int(torch.nonzero(labels == c)[0]) for c in range(10)]
    assert first_of_each == sorted(first_of_each)
    assert labels.dtype == torch.int64
    assert labels.shape == (50,)


def test_duplicate_vectors_form_their_own_clusters_and_the_rounds_terminate() -> None:
    # A blank region repeats one vector: all distances are 0, every round merges at height 0.
    generator = torch.Generator().manual_seed(7)
    distinct = _unit(generator, 3)
    page = distinct[torch.tensor([0, 1, 2] * 10)]
    assert _partition(ward_labels([page], [3])[0].numpy()) == [tuple(range(start, 30, 3)) for start in range(3)]
    constant = distinct[:1].repeat(12, 1)
    pooled = pool_tensors([constant], 3)[0]
    assert pooled.shape == (4, 128)
    torch.testing.assert_close(pooled, distinct[:1].repeat(4, 1))
    # The documented difference: every merge is tied at height 0, scipy's maxclust cut takes them all and
    # colpali-engine keeps ONE vector; the MaxSim of the two results is the same.
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    reference, _ = HierarchicalTokenPooler()._pool_single_embedding(constant, 3)
    assert reference.shape == (1, 128)
    query = _unit(generator, 5)
    assert maxsim_reference(query, [pooled])[0] == pytest.approx(maxsim_reference(query, [reference])[0], abs=1e-6)


def test_near_duplicate_float16_vectors_are_pooled_not_refused_as_non_finite() -> None:
    # Vectors of a near-blank region differ by an ulp here and there in float16. Their distances are rounding noise,
    # and `c_aᵀ G c_b` rounds differently from `c_bᵀ G c_a`: an asymmetric matrix let the nearest neighbours form a
    # cycle without a reciprocal pair, and a finite page was refused as "non-finite".
    generator = torch.Generator().manual_seed(0)
    base = _unit(generator, 3)
    rows = base[torch.randint(0, 3, (300,), generator=generator)] + 1e-7 * torch.randn(300, 128, generator=generator)
    page = rows.to(torch.float16)
    labels = ward_labels([page.float()], [100])[0]
    assert int(labels.max()) + 1 == 100
    pooled = pool_tensors([page], 3)[0]
    assert pooled.shape == (100, 128)
    assert torch.isfinite(pooled).all()


def test_one_host_sync_per_round_and_far_fewer_rounds_than_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU every host sync stalls the launch queue; a merge-by-merge loop synced ~512 times for one 768-vector
    # page pooled by 3. The rounds sync once each (the stacked `tolist`), and a handful of rounds suffice.
    pages = [_topical(torch.Generator().manual_seed(b), 768) for b in range(4)]
    labels, calls = _host_syncs(monkeypatch, lambda: ward_labels(pages, [256] * 4))
    assert [int(label.max()) + 1 for label in labels] == [256] * 4
    assert 1 <= calls <= 40  # measured: 10-11 rounds for such pages (vs 512 merges each)


def test_a_non_finite_page_is_passed_on_unpooled_and_never_looped_on() -> None:
    # The stores refuse it naming its document (as without pooling); the clustering itself refuses it too.
    generator = torch.Generator().manual_seed(2)
    broken, fine = _unit(generator, 20), _unit(generator, 20)
    broken[4, 0] = float("nan")
    pooled = pool_tensors([broken, fine], 2)
    assert pooled[0] is broken
    assert pooled[1].shape == (10, 128)
    with pytest.raises(ValueError, match="non-finite"):
        ward_labels([broken], [10])


def test_pooled_pages_keep_their_dtype_and_device() -> None:
    generator = torch.Generator().manual_seed(4)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        pages = [_unit(generator, 33).to(dtype), _unit(generator, 1).to(dtype)]
        pooled = pool_tensors(pages, 3)
        assert [p.dtype for p in pooled] == [dtype, dtype]
        assert [tuple(p.shape) for p in pooled] == [(11, 128), (1, 128)]
        assert pooled[1] is pages[1]  # a single vector is returned as it is
        reference = pool_tensors([pages[0].float()], 3)[0]
        torch.testing.assert_close(pooled[0].float(), reference, atol=1e-2, rtol=0)


def test_pool_multivectors_edge_cases() -> None:
    rng = np.random.default_rng(0)
    page = rng.standard_normal((9, 8)).astype(np.float32)
    page /= np.linalg.norm(page, axis=1, keepdims=True)
    assert np.array_equal(pool_multivectors([page], 1)[0], page)  # pool_factor 1: unchanged
    single = page[:1]
    assert np.array_equal(pool_multivectors([single], 3)[0], single)  # one vector: nothing to pool
    pooled = pool_multivectors([page, page[:4]], 3)
    assert [p.shape for p in pooled] == [(3, 8), (1, 8)]
    assert pooled[0].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pooled[0], axis=1), 1.0, atol=1e-6)
    assert pool_multivectors([], 3) == []


def test_a_long_page_is_not_batched_with_short_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # ward_labels pads every page of a call to the longest ((pages, width, width) float64 matrices): a 4000-vector
    # page with 15 short ones made each short page cost as much as the long one (11x the time, 3.5 GiB).
    from haystack_integrations.common.multimodal_rag.numerics import pooling

    generator = torch.Generator().manual_seed(7)
    pages = [_topical(generator, n) for n in (400, 30, 25, 380, 150, 20, 2)]
    calls: list[list[int]] = []
    real = pooling.ward_labels

    def spy(embeddings: list[torch.Tensor], n_clusters: list[int]) -> list[torch.Tensor]:
        calls.append([int(e.shape[0]) for e in embeddings])
        return real(embeddings, n_clusters)

    monkeypatch.setattr(pooling, "ward_labels", spy)
    pooled = pool_tensors(pages, 3)
    assert calls
    for lengths in calls:
        assert 2 * min(lengths) >= max(lengths), calls
    monkeypatch.undo()
    for page, out in zip(pages, pooled, strict=True):
        torch.testing.assert_close(out, pool_tensors([page], 3)[0])


def test_a_page_of_repeated_vectors_pairs_them_off_in_few_rounds_with_colpali_engines_maxsim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A blank margin comes out of a bf16 model as identical rows. Breaking distance ties by the lowest slot made
    # every copy point at the first one: one merge per round, 577 rounds (host syncs on a GPU) for a blank page.
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    generator = torch.Generator().manual_seed(11)
    blank = _unit(generator, 1).repeat(768, 1)
    margin = torch.cat([_unit(generator, 1).repeat(600, 1), _unit(generator, 168)])
    labels, calls = _host_syncs(monkeypatch, lambda: ward_labels([blank, margin], [256, 256]))
    assert [int(label.max()) + 1 for label in labels] == [256, 256]
    assert calls <= 40  # measured: 11 rounds for the blank page
    pooled = pool_tensors([margin], 3)[0]
    reference, _ = HierarchicalTokenPooler()._pool_single_embedding(margin, 3)
    # The cut falls among merges of height 0, where scipy's maxclust keeps fewer clusters (it merges every copy):
    # the counts differ, the distinct vectors and so every MaxSim are the same.
    assert pooled.shape[0] == 256
    assert reference.shape[0] < 256
    query = _unit(generator, 12)
    assert maxsim_reference(query, [pooled])[0] == pytest.approx(maxsim_reference(query, [reference])[0], rel=1e-5)
