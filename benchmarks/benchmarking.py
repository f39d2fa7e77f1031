"""Measurement helpers shared by the benchmarks: FLOP counts, GEMM peak, timing.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts
matrix products only (mm, bmm, addmm, ...), the convention of the speed issue.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products executed by ``fn()`` (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_by_operator(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs per aten operator (e.g. {'mm': ..., 'bmm': ...})."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    return {str(k).split(".")[-1]: int(v) for k, v in counts.items()}


def gemm_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 1536, repeats: int = 8,
                     device: str = "cpu") -> float:
    """Best-of-``repeats`` GFLOP/s of an n×n×n matrix product (the machine's practical GEMM peak)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device="cpu") -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def machine_info() -> dict:
    """Where a benchmark ran: CPU, threads, torch version, GPU if any."""
    info = {
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info
