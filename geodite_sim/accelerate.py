"""Static shapes for accelerated steps: capacity buckets and CUDA-graph capture.

The runner keeps the shapes of its padded batch and edge list in a few capacity buckets (:func:`bucket`,
:func:`next_capacity`) while its step is compiled (``torch.compile``) or captured in a CUDA graph, so
consecutive steps and most re-packs keep the same shapes; :class:`CapturedStep` captures a function of static
buffers in a ``torch.cuda.CUDAGraph`` (used by :mod:`geodite_sim.runner.capture`, which replays the whole step).
The acceleration modes themselves (``"auto"``, ``"eager"``, ``"compile"``, ``"cuda_graph"``) are the runner's:
:mod:`geodite_sim.runner.acceleration`, ``StepConfig.accelerate``. See ``docs/gpu.md``.
"""

from __future__ import annotations

import math

import torch


# ---------------------------------------------------------------------------------------------- buckets
def bucket(n: int, minimum: int = 1) -> int:
    """The smallest capacity >= max(n, minimum) of the form m * 2^k with 8 <= m < 16 (<= 12.5% waste)."""
    n = max(int(n), int(minimum), 1)
    if n <= 16:
        return n
    k = max(n.bit_length() - 4, 0)  # 2^k is the grid step: n / 2^k lies in [8, 16)
    return -(-n // (1 << k)) << k


def next_capacity(needed: int, current: int | None, minimum: int, headroom: float, shrink: float) -> int:
    """Keep ``current`` while ``needed`` fits and uses more than ``shrink`` of it; else re-bucket with headroom."""
    if current is not None and shrink * current <= needed <= current:
        return current
    return bucket(math.ceil(needed * (1.0 + headroom)), minimum)


# ---------------------------------------------------------------------------------------------- padded step


class CapturedStep:
    """A function of static buffers captured in a ``torch.cuda.CUDAGraph``; ``replay()`` refreshes ``outputs``.

    The function runs twice on a side stream first (lazy initialisation of cuBLAS handles, autograd
    and the caching allocator must not happen during capture), then once under capture. The cached
    blocks of the warm-up (and of evicted graphs) are released before the capture, whose private
    memory pool holds one step's activations for as long as the graph lives.
    """

    def __init__(self, fn, device: torch.device):
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self) -> None:
        self.graph.replay()


__all__ = ["CapturedStep", "bucket", "next_capacity"]
