"""The host's matrix-product rate: 1024³ float32 products in MLX, numpy and torch.

This is the roofline the bench's "share of peak" column divides by, and what `mlxft doctor`
prints to show which BLAS MLX runs on (the stock Linux wheel's reference BLAS is ~30x slower).
Each rate is the best of a few timed products after one untimed warm-up.
"""

from __future__ import annotations

import os
import time

SIZE = 1024


def _best_rate(multiply, size: int, min_seconds: float, max_repeats: int) -> float:
    """GFLOP/s of the fastest timed product (fastest, not mean: other processes share the host)."""
    start = time.perf_counter()
    multiply()  # warm-up: thread pools, packing buffers, lazy initialisation
    first = time.perf_counter() - start
    if first > min_seconds:  # a slow BLAS (the stock wheel's: ~0.4 s a product): set-up is noise next to it
        return 2 * size**3 / first / 1e9
    best, spent, repeats = float("inf"), 0.0, 0
    while repeats < max_repeats and (repeats < 2 or spent < min_seconds):
        start = time.perf_counter()
        multiply()
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return 2 * size**3 / best / 1e9


def _operands(size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)


def mlx_rate(size: int = SIZE, min_seconds: float = 0.5, max_repeats: int = 20) -> float:
    import mlx.core as mx

    a, b = (mx.array(x) for x in _operands(size))
    return _best_rate(lambda: mx.eval(a @ b), size, min_seconds, max_repeats)


def numpy_rate(size: int = SIZE, min_seconds: float = 0.5, max_repeats: int = 20) -> float:
    a, b = _operands(size)
    return _best_rate(lambda: a @ b, size, min_seconds, max_repeats)


def torch_rate(size: int = SIZE, min_seconds: float = 0.5, max_repeats: int = 20) -> float:
    import torch

    a, b = (torch.from_numpy(x) for x in _operands(size))
    return _best_rate(lambda: a @ b, size, min_seconds, max_repeats)


THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
RATES = {"mlx": mlx_rate, "numpy": numpy_rate, "torch": torch_rate}


def measure(frameworks=("mlx", "numpy", "torch"), **kwargs) -> dict[str, float]:
    """{framework: GFLOP/s} for the frameworks asked for."""
    return {name: RATES[name](**kwargs) for name in frameworks}


def openblas_threads() -> int | None:
    """Threads of the OpenBLAS that mlxft's shim routes MLX's products to, when it is loaded."""
    if not os.environ.get("MLXFT_BLAS_ACTIVE"):
        return None
    try:
        import ctypes

        return int(ctypes.CDLL(None).scipy_openblas_get_num_threads())
    except (OSError, AttributeError):
        return None


def set_threads(threads: int) -> None:
    """Every thread pool a benchmark side may use, before its libraries start their pools.
    OpenBLAS (numpy's and the shim's) reads these variables when it loads, so a process sets
    them before importing numpy or mlx; torch takes its count at run time as well."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
