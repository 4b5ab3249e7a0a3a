"""Hierarchical token pooling of page multi-vectors (colpali-engine's `HierarchicalTokenPooler`), batched in torch.

colpali-engine's pooler (colpali_engine/compression/token_pooling/hierarchical_token_pooling.py:118-123) passes
the square matrix `1 - E Eᵀ` of a page's vectors `E` to `scipy.cluster.hierarchy.linkage(..., metric="euclidean",
method="ward")`, i.e. as n observations of dimension n (not as a distance matrix), cuts the tree with
`fcluster(t=max(n // pool_factor, 1), criterion="maxclust")` and keeps each cluster's L2-normalised mean vector.

Here the same clusters come from the reciprocal-nearest-neighbour form of Ward's method, which merges EVERY pair
of clusters that are each other's nearest neighbour in one round. Ward's distance is reducible (merging two
clusters never brings the result closer to a third than the nearer of the two was), so merging all such pairs at
once builds the same tree as scipy's one-merge-at-a-time algorithm (Murtagh, "A survey of recent advances in
hierarchical clustering algorithms", The Computer Journal 26(4), 1983). Every merge is recorded with its height;
the maxclust cut keeps the `n - k` lowest merges (Ward's heights are monotone, so they are the first `n - k` merges
scipy makes). Rounds stop as soon as those merges are known: any merge not yet made is at least as high as the
closest pair of clusters left. A 768-vector page pooled by 3 needs about 10 rounds instead of 512 merges.

Distances never touch the n-dimensional rows: for rows `S_a = E e_a` of `S = E Eᵀ` and cluster means `c = mean e`,
`|mean_A S - mean_B S|² = (c_A - c_B)ᵀ (EᵀE) (c_A - c_B)`, so each round costs one `(m, d) @ (d, d)` and one
`(m, d) @ (d, m)` product per page (float64, as scipy computes), with the clusters still left compacted to the
front between rounds.

The pages of a batch run together (in groups of similar length: each is padded to its group's longest), on
their own device, one host synchronisation per round (whether every page is done): on a GPU that is ~10 syncs and
a few hundred kernels per group, where a merge-by-merge loop needs one sync and ~30 kernels per merge. On the
CPU the pages are dealt out to the MaxSim kernel's fixed workers, whose torch calls run single-threaded: torch's
own thread team, spinning against another library's (a numpy/OpenBLAS call just before), made a 20 ms page take
100 ms to 1 s on the 2-core machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from haystack_integrations.common.multimodal_rag.numerics.maxsim import CPU_THREADS, cpu_workers

__all__ = ["pool_multivectors", "pool_tensors", "ward_labels"]


def ward_labels(embeddings: list[torch.Tensor], n_clusters: list[int]) -> list[torch.Tensor]:
    """
    Ward clusters of the rows of `1 - E Eᵀ` of each page, cut at `n_clusters` (colpali-engine's pooler).

    :param embeddings: `(n_b, dim)` float tensors on one device, `n_b >= 1`.
    :param n_clusters: Clusters per page, `1 <= n_clusters[b] <= n_b`.
    :returns: Per page, `(n_b,)` int64 labels in `[0, n_clusters[b])` on the pages' device, numbered by each
        cluster's first vector.
    :raises ValueError: When a page holds non-finite values (no nearest neighbours can be found).
    """
    device = embeddings[0].device
    count, dim = len(embeddings), int(embeddings[0].shape[1])
    sizes = [int(e.shape[0]) for e in embeddings]
    width = max(sizes)
    x = torch.zeros((count, width, dim), dtype=torch.float64, device=device)
    for b, page in enumerate(embeddings):
        x[b, : sizes[b]] = page.to(torch.float64)
    gram = x.transpose(1, 2) @ x  # (B, d, d); zero padding rows add nothing
    lengths = torch.tensor(sizes, device=device)
    steps = lengths - torch.tensor(n_clusters, device=device)  # merges each page needs
    columns = torch.arange(width, device=device)
    # Per original vector ("slot"): the slot it was merged into, the merge's height and round (itself / inf / 0:
    # not merged).
    # Column `width` is a sink for the writes of rows that did not merge.
    partner = torch.arange(width + 1, device=device).repeat(count, 1)
    height = torch.full((count, width + 1), math.inf, dtype=torch.float64, device=device)
    when = torch.zeros((count, width + 1), dtype=torch.long, device=device)
    sink = torch.full((count, width), width, device=device)

    cent = x  # cluster means in the d-dimensional space, compacted to the front
    weight = torch.ones((count, width), dtype=torch.float64, device=device)
    slot = columns.repeat(count, 1)  # the original slot each compacted cluster stands for
    active = columns[None, :] < lengths[:, None]
    for round_ in range(1, width + 1):
        m = cent.shape[1]
        local = torch.arange(m, device=device)
        proj = cent @ gram
        sq = (proj * cent).sum(-1)
        dist = torch.baddbmm(sq[:, :, None] + sq[:, None, :], proj, cent.transpose(1, 2), alpha=-2.0).clamp_min_(0.0)
        dist *= (weight[:, :, None] * weight[:, None, :]).div_(weight[:, :, None] + weight[:, None, :])
        # `c_aᵀ G c_b` and `c_bᵀ G c_a` round differently: unless `dist` is exactly symmetric, near-duplicate
        # vectors (a blank region in float16) can point at each other in a cycle with no reciprocal pair.
        dist = torch.minimum(dist, dist.transpose(1, 2))
        dist.masked_fill_(~active[:, :, None], math.inf).masked_fill_(~active[:, None, :], math.inf)
        dist.diagonal(dim1=1, dim2=2).fill_(math.inf)
        row_min = dist.amin(2)
        # Among neighbours at exactly the same distance (repeated vectors: a blank margin comes out of a bf16
        # model as identical rows), take the one whose position among the clusters left differs least in its bits
        # (`i ^ j`), not the lowest position: with the lowest every copy points at the first one and only one pair
        # merges per round (577 rounds for a blank 768-vector page); with `i ^ j` the copies pair off, halving a
        # contiguous group each round (copies scattered among other vectors take a few more rounds). For a fixed
        # `i`, `i ^ j` differs for every `j`, and `dist` is exactly symmetric, so the pair with the least `i ^ j`
        # among those at the page's closest distance is always reciprocal: every round still merges.
        tied = torch.where(dist == row_min[:, :, None], local[:, None] ^ local[None, :], 2 * m)  # i ^ j < 2m
        nearest = tied.argmin(2)
        closest = row_min.amin(1)
        known = (height[:, :width] < closest[:, None]).sum(1)
        done = known >= steps
        reciprocal = active & (nearest.gather(1, nearest) == local) & torch.isfinite(row_min) & ~done[:, None]
        keeper = reciprocal & (local[None, :] < nearest)  # absorbs its partner
        absorbed = reciprocal & (local[None, :] > nearest)
        # The round's one host sync: whether every page knows its merges, whether a page cannot progress, and how
        # wide the next round must be.
        finished, stuck, left = torch.stack(
            [done.all(), (~done & ~reciprocal.any(1)).any(), (active & ~absorbed).sum(1).max()]
        ).tolist()
        if finished:
            break
        if stuck:
            raise ValueError("hierarchical pooling found no nearest neighbours: a page holds non-finite vectors")
        target = torch.where(absorbed, slot, sink[:, :m])
        partner.scatter_(1, target, slot.gather(1, nearest))
        height.scatter_(1, target, row_min)
        when.scatter_(1, target, torch.full_like(target, round_))
        other_weight = weight.gather(1, nearest)
        other = cent.gather(1, nearest[:, :, None].expand(-1, -1, dim))
        merged = (weight[:, :, None] * cent + other_weight[:, :, None] * other) / (weight + other_weight)[:, :, None]
        cent = torch.where(keeper[:, :, None], merged, cent)
        weight = torch.where(keeper, weight + other_weight, weight)
        active = active & ~absorbed
        if left < m:
            order = torch.sort(active.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :left]
            cent = cent.gather(1, order[:, :, None].expand(-1, -1, dim))
            weight, slot, active = weight.gather(1, order), slot.gather(1, order), active.gather(1, order)
    # The maxclust cut: the `steps` lowest merges of each page (ties: the earlier round first, so a cluster is
    # always formed before it merges again), then every slot follows its kept merges to its cluster's first slot.
    by_round = torch.sort(when[:, :width], dim=1, stable=True).indices
    order = by_round.gather(1, torch.sort(height[:, :width].gather(1, by_round), dim=1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, columns.repeat(count, 1))
    root = torch.where(rank < steps[:, None], partner[:, :width], columns[None, :])
    for _ in range(max(1, math.ceil(math.log2(width + 1)))):
        root = root.gather(1, root)
    # A cluster's root is its first slot (a merge always keeps the lower slot): number the roots in slot order
    # (no `torch.unique`, which would sync with the host once per page).
    first = (root == columns[None, :]) & (columns[None, :] < lengths[:, None])
    number = first.cumsum(1) - 1
    labels = number.gather(1, root)
    return [labels[b, : sizes[b]] for b in range(count)]


def _ward_by_length(embeddings: list[torch.Tensor], n_clusters: list[int]) -> list[torch.Tensor]:
    """
    `ward_labels` over groups of pages of similar length (the shortest of a group at least half its longest).

    One call pads every page to the longest and works on `(pages, width, width)` float64 matrices, so a 4000-vector
    page batched with short ones made each of them cost as much as it (a 4000-vector page and 15 of 20 vectors:
    11x the time and 3.5 GiB instead of 0.9 GiB). Pages of one model are mostly of one length: one group.
    """
    order = sorted(range(len(embeddings)), key=lambda b: -int(embeddings[b].shape[0]))
    groups: list[list[int]] = []
    for b in order:
        if groups and 2 * int(embeddings[b].shape[0]) >= int(embeddings[groups[-1][0]].shape[0]):
            groups[-1].append(b)
        else:
            groups.append([b])
    labels: list[torch.Tensor] = [torch.empty(0)] * len(embeddings)
    for group in groups:
        for b, label in zip(
            group, ward_labels([embeddings[b] for b in group], [n_clusters[b] for b in group]), strict=True
        ):
            labels[b] = label
    return labels


def _labels_on_their_device(embeddings: list[torch.Tensor], n_clusters: list[int]) -> list[torch.Tensor]:
    """`ward_labels` by length group; on the CPU split over the fixed single-threaded workers of the MaxSim kernel."""
    workers = cpu_workers() if embeddings[0].device.type == "cpu" else None
    if workers is None:
        return _ward_by_length(embeddings, n_clusters)
    # Torch's own intra-op threads would spin against other libraries' thread teams (a numpy/OpenBLAS call just
    # before made a 20 ms page take 100-1000 ms on 2 cores); the pinned workers cannot oversubscribe. Pages are
    # independent: long and short ones are dealt out in turn so the workers get similar shares.
    order = sorted(range(len(embeddings)), key=lambda b: -int(embeddings[b].shape[0]))
    shares = [order[w::CPU_THREADS] for w in range(CPU_THREADS)]
    futures = [
        (share, workers.submit(_ward_by_length, [embeddings[b] for b in share], [n_clusters[b] for b in share]))
        for share in shares
        if share
    ]
    labels: list[torch.Tensor] = [torch.empty(0)] * len(embeddings)
    for share, future in futures:
        for b, label in zip(share, future.result(), strict=True):
            labels[b] = label
    return labels


def pool_tensors(embeddings: list[torch.Tensor], pool_factor: int) -> list[torch.Tensor]:
    """
    Hierarchical token pooling of page multi-vectors on their own device.

    Keeps colpali-engine's `HierarchicalTokenPooler` results: the same Ward clusters of `1 - E Eᵀ`,
    `max(n // pool_factor, 1)` of them, each the L2-normalised mean of its vectors. Only the ORDER of the pooled
    vectors may differ (ours: by each cluster's first token; MaxSim does not depend on it). Pages with fewer than
    2 vectors are returned as they are (colpali-engine raises on them). One exception: when merges of exactly
    equal height straddle the cut (repeated identical vectors, e.g. a blank page), scipy's maxclust cut takes
    all of them and colpali-engine returns FEWER than `max(n // pool_factor, 1)` vectors; here the count is
    always `max(n // pool_factor, 1)`, the extra vectors repeating a cluster's mean (the same MaxSim). Exact
    ties between DISTINCT vectors (equally distant pairs, e.g. one-hot rows; not met in model outputs) may be
    broken another way than scipy's: other, equally valid clusters, so the pooled vectors and MaxSim can differ.

    :param embeddings: `(n_b, dim)` tensors (padding removed), all on one device.
    :param pool_factor: At least 1; 1 returns the inputs.
    :returns: Per page a `(max(n_b // pool_factor, 1), dim)` tensor, the input's dtype and device; a page holding
        NaN or infinite values comes back unpooled, as it is (the stores refuse it by document id).
    """
    if pool_factor <= 1:
        return list(embeddings)
    todo = [b for b, emb in enumerate(embeddings) if emb.shape[0] >= 2]
    out = list(embeddings)
    if not todo:
        return out
    # A page holding NaN or inf (a broken model or file) has no clusters: it is passed on unpooled, so the store
    # refuses it naming its document and a kernel scores it non-finite, as without pooling. One host sync.
    finite = torch.stack([torch.isfinite(embeddings[b]).all() for b in todo]).tolist()
    todo = [b for b, ok in zip(todo, finite, strict=True) if ok]
    if not todo:
        return out
    n_clusters = [max(int(embeddings[b].shape[0]) // pool_factor, 1) for b in todo]
    all_labels = _labels_on_their_device([embeddings[b] for b in todo], n_clusters)
    for b, k, labels in zip(todo, n_clusters, all_labels, strict=True):
        values = embeddings[b].to(torch.float32)  # float32 means, like colpali-engine's
        sums = torch.zeros((k, values.shape[1]), dtype=torch.float32, device=values.device)
        sums.index_add_(0, labels, values)
        counts = torch.zeros(k, dtype=torch.float32, device=values.device)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float32))  # bincount would sync
        pooled = torch.nn.functional.normalize(sums / counts[:, None], dim=-1)
        out[b] = pooled.to(dtype=embeddings[b].dtype)
    return out


def pool_multivectors(vectors: list[np.ndarray], pool_factor: int, *, device: str = "cpu") -> list[np.ndarray]:
    """
    Hierarchical token pooling of page multi-vectors, as `embed_images(..., pool_factor=...)` pools stored pages.

    :param vectors: `(n_vectors, dim)` arrays.
    :param pool_factor: Keep `max(n_vectors // pool_factor, 1)` vectors per page; 1 keeps them all.
    :param device: Torch device to cluster on (e.g. the model's).
    :returns: The pooled arrays, `float32`, L2-normalised rows (unchanged arrays when `pool_factor <= 1`, and for
        pages holding NaN or infinite values).
    """
    tensors = [torch.as_tensor(np.asarray(array, dtype=np.float32), device=device) for array in vectors]
    return [t.cpu().numpy() for t in pool_tensors(tensors, pool_factor)] if tensors else []
