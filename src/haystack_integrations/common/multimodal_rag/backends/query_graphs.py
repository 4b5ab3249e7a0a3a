"""CUDA graphs of a late-interaction model's query forward: one query encoded by one graph replay.

Encoding one query is a few milliseconds of GPU work issued as ~1,500 small kernels; on an H100 the host needs
~25 ms to launch them (ColQwen2.5-3B-shaped model: 28.5 ms p50 eager; the GPU time under the profiler 6.1 ms).
A CUDA graph captured once replays the whole forward with one launch.

A graph has fixed shapes, so each query is padded on the RIGHT to a bucket length (32, 64, ... 512 tokens), with
`attention_mask` 0 on the padding. Every supported family masks padded keys, and its valid tokens' positions do
not depend on what follows them (text positions count from the start, or from the mask's cumulative sum, which
right padding leaves unchanged on the valid tokens), so the valid rows are the same function of the query as
without padding (ColPali's are not: see below). They are not bit-identical: bf16 kernels picked for another length
round differently (on a 36-layer random-weight ColQwen2.5-3B-shaped model, max abs difference 0.0098 on values up
to 0.32). Graphs are captured lazily, one per bucket and input layout, on first use; capture runs the forward three
times, then checks two replays against the unpadded forward (the query itself, and its first token with its second
half: other tokens, at least half the bucket of padding) and keeps its activations' memory (not measured). A model
whose forward cannot be captured (a host synchronisation inside it), or whose valid rows change with padding, is
logged once and encoded without graphs from then on. ColPali (PaliGemma) is such a model and is never captured
(`backends/colpali.py`). One capture runs at a time in the process (`torch.cuda.graph` allows no more), on the
model's device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from haystack import logging

logger = logging.getLogger(__name__)

#: Padded query lengths; a longer query is encoded eagerly.
BUCKETS = (32, 64, 128, 256, 512)

_WARMUP_RUNS = 2  # forwards on a side stream before capture (cuBLAS/cuDNN workspaces, lazy module state)
#: At capture, each valid row of the padded replay must point where the plain forward's does (bf16 rounding on a
#: 36-layer random model: >= 0.998; a model whose padding leaks into the valid rows: far lower).
_MIN_ROW_COSINE = 0.99
#: `torch.cuda.graph` allows one capture at a time in a process: encoders of two models, or two threads, capture
#: one after the other.
_CAPTURE_LOCK = threading.Lock()


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> None:
        self.graph = graph
        self.inputs = inputs
        self.output = output


class QueryGraphs:
    """
    Captured forwards of one model, by padded length and input layout; thread-safe.

    :param forward: Calls the model on a dict of `(1, length)` tensors on `device` and returns its `(1, length, dim)`
        output (padding rows may hold anything: only the valid rows are read).
    :param device: The model's CUDA device.
    :param pad_values: Fill value per input name for the padding (e.g. `{"input_ids": pad_token_id}`); inputs not
        named here are padded with 0 (`attention_mask` must be 0 there).
    :param name: The model, for the log message when capture fails.
    """

    def __init__(
        self,
        forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        *,
        device: str | torch.device,
        pad_values: dict[str, int],
        name: str,
    ) -> None:
        self._forward = forward
        self.device = torch.device(device)
        self._pad_values = pad_values
        self._name = name
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._lock = threading.Lock()
        self._done: torch.cuda.Event | None = None  # recorded after the last replay's output was copied out
        self.disabled = False
        self.replays = 0

    @staticmethod
    def bucket(length: int) -> int | None:
        """The padded length for a query of `length` tokens, or `None` when it is longer than every bucket."""
        return next((b for b in BUCKETS if b >= length), None)

    @torch.inference_mode()
    def run(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """
        The model's output rows for the query's tokens, from a graph replay; `None` where no graph applies.

        No graph applies to a batch of more than one query, to inputs that are not all `(1, length)` integer
        tensors (e.g. pixel values), to a query padded by its processor (a host `attention_mask` with zeros: the
        replay returns the first `length` rows), to a query longer than the last bucket, or once capture has failed.

        :param batch: The processor's batch for ONE query (host or device tensors), `attention_mask` included.
        :returns: `(length, dim)` on the device, a fresh tensor (the graph's buffers are reused by the next call).
        """
        if self.disabled:
            return None
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        mask = inputs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != 1:
            return None
        length = int(mask.shape[1])
        for value in inputs.values():
            if not (
                isinstance(value, torch.Tensor)
                and value.shape == mask.shape
                and not value.is_floating_point()
                and not value.is_complex()
            ):
                return None
        if mask.device.type == "cpu" and not bool(mask.all()):
            return None
        padded = self.bucket(length)
        if padded is None:
            return None
        key = (padded, tuple(sorted((k, v.dtype) for k, v in inputs.items())))
        with self._lock:
            if self.disabled:  # by another thread's failed capture while this one waited for the lock
                return None
            current = torch.cuda.current_stream(self.device)
            if self._done is not None:
                current.wait_event(self._done)  # the previous caller's output copy (maybe on another stream)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._capture(inputs, padded)
                if graph is None:
                    return None
                self._graphs[key] = graph
            self._fill(graph.inputs, inputs, length)
            graph.graph.replay()
            out = graph.output[0, :length].clone()
            self._done = torch.cuda.Event()
            self._done.record(current)
            self.replays += 1
            return out

    def _fill(self, static: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], length: int) -> None:
        for name, buffer in static.items():
            buffer[0, :length].copy_(inputs[name][0], non_blocking=True)
            buffer[0, length:].fill_(self._pad_values.get(name, 0))

    def _capture(self, inputs: dict[str, torch.Tensor], padded: int) -> _Graph | None:
        length = int(inputs["attention_mask"].shape[1])
        static = {
            name: torch.zeros((1, padded), dtype=value.dtype, device=self.device) for name, value in inputs.items()
        }
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        try:
            with _CAPTURE_LOCK, torch.cuda.device(self.device):
                try:
                    self._fill(static, inputs, length)
                    side.wait_stream(current)
                    with torch.cuda.stream(side):
                        for _ in range(_WARMUP_RUNS):
                            self._forward(static)
                    current.wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    # Captured on `side`, a stream of the model's device: without `stream`, torch.cuda.graph uses one
                    # stream per process, made on the device current at the first capture, and a forward on another
                    # device would run instead of being captured (an empty graph: every replay returns the capture
                    # query's rows). thread_local: the ranker's fetch thread may upload pages meanwhile; only this
                    # thread's calls are checked for what a capture forbids.
                    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                        output = self._forward(static)
                finally:
                    # When the capture fails, torch.cuda.graph's __exit__ raises before it restores the stream it made
                    # current: this thread's later work would run on the capture stream.
                    torch.cuda.set_stream(current)
                captured = _Graph(graph, static, output)
                agreement = self._agreement(captured, inputs)
        except Exception as error:  # a forward with a host sync (or anything else a capture forbids)
            _reset_generator_after_failed_capture(self.device)
            self._disable()
            logger.warning(
                "{model}: the query forward cannot be captured as a CUDA graph ({error}); queries are encoded "
                "without one (slower on a GPU, same results)",
                model=self._name,
                error=f"{type(error).__name__}: {error}",
            )
            return None
        # The padded replays must give the plain forward's rows: a model that lets padding change the valid
        # tokens' outputs (e.g. attention that ignores the padding mask) is encoded without graphs.
        if not agreement >= _MIN_ROW_COSINE:
            self._disable()
            logger.warning(
                "{model}: padding changes this model's query vectors (row cosine {agreement:.4f} against the "
                "unpadded forward), so its queries are encoded without CUDA graphs (slower on a GPU)",
                model=self._name,
                agreement=agreement,
            )
            return None
        return captured

    def _agreement(self, graph: _Graph, inputs: dict[str, torch.Tensor]) -> float:
        """
        The lowest row cosine between the graph's replays and the plain forward, for two probes of the query.

        The query itself, then its first token followed by its second half: other tokens at the same positions
        (a replay that does not recompute from its inputs returns the query's rows there) and at least half the
        bucket of padding (the query alone pads nothing when it fills its bucket).
        """
        length = int(inputs["attention_mask"].shape[1])
        half = max(length // 2, 1)
        probes = [
            {name: torch.cat([value[:, :1], value[:, length - half + 1 :]], dim=1) for name, value in inputs.items()}
        ]
        probes.append(inputs)
        worst = 1.0
        for probe in probes:
            rows = int(probe["attention_mask"].shape[1])
            self._fill(graph.inputs, probe, rows)
            graph.graph.replay()
            plain = self._forward({name: value.to(self.device) for name, value in probe.items()})[0, :rows]
            cosine = torch.nn.functional.cosine_similarity(graph.output[0, :rows].float(), plain.float(), dim=-1)
            worst = min(worst, float(cosine.min()))
        return worst

    def _disable(self) -> None:
        self.disabled = True
        torch.cuda.synchronize(self.device)  # no replay still runs when the graphs and their memory are released
        self._graphs.clear()


def _reset_generator_after_failed_capture(device: torch.device) -> None:
    """
    Leave the device's default random generator usable after a capture that failed.

    `torch.cuda.graph` marks the default CUDA generator as capturing when a capture begins and unmarks it only when
    the capture ends well (CUDAGraph::capture_end calls the generator's capture_epilogue after
    cudaStreamEndCapture, which raises for a failed capture). Left marked, every later random op on the device
    raises "Offset increment outside graph capture encountered unexpectedly" (seen on an H100 in
    tests/test_cuda_paths.py, torch 2.11): dropout, sampling generators, `torch.randn`. A trivial capture that ends
    well runs the prologue and epilogue again and unmarks it; it is never replayed.
    """
    try:
        with _CAPTURE_LOCK, torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            scratch = torch.zeros(1, device=device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=side):
                    scratch.add_(1)
            finally:
                torch.cuda.set_stream(current)
    except Exception as error:  # nothing more to do: the caller falls back to the plain forward anyway
        logger.debug("Could not reset the CUDA generator after a failed capture: {error}", error=error)
