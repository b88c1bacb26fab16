"""`mlxft doctor`: what this host gives mlxft to work with, in a few seconds.

Versions of the libraries mlxft runs on, MLX's device and which BLAS its CPU products go
through (the stock Linux wheel's reference BLAS is ~30x slower than an optimized one), the
measured 1024³ float32 GEMM rate of MLX, numpy and torch with the threads each uses, and the
device `--backend torch` would pick.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("mlx", "mlx-lm", "torch", "transformers", "peft")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[tuple[str, str]]:
    """(label, value) lines, in the order they print."""
    from mlxft import blas
    from mlxft.backends import torch_available
    from mlxft.bench import gemm

    lines = [("platform", f"{platform.platform()} ({platform.machine()})"),
             ("python", f"{platform.python_version()} ({sys.executable})")]
    lines += [(name, version(name)) for name in PACKAGES]
    import mlx.core as mx

    lines.append(("MLX device", str(mx.default_device())))
    described = blas.describe()
    if described.startswith("reference BLAS") and blas.wanted():
        try:
            _, why = blas.ensure_shim()
        except Exception as e:  # report, never fail, in a diagnostic
            why = f"{type(e).__name__}: {e}"
        shim_note = f"; the OpenBLAS shim is not in use ({why or 'run mlxft through its command, which preloads it'})"
        described += shim_note
    lines.append(("MLX BLAS", described))
    threads = gemm.openblas_threads()
    lines.append(("MLX GEMM", f"{gemm.mlx_rate(min_seconds=0.3):.1f} GFLOP/s (1024^3 fp32, "
                              f"{f'{threads} OpenBLAS threads' if threads else '1 thread'})"))
    import numpy as np

    lines.append(("numpy GEMM", f"{gemm.numpy_rate(min_seconds=0.3):.1f} GFLOP/s (1024^3 fp32, numpy {np.__version__})"))
    if torch_available():
        import torch

        from mlxft.backends.torch.model import pick_device

        rate = gemm.torch_rate(min_seconds=0.3)
        lines.append(("torch GEMM", f"{rate:.1f} GFLOP/s (1024^3 fp32, {torch.get_num_threads()} threads)"))
        lines.append(("torch device", f"{pick_device()} (what --backend torch uses)"))
    else:
        lines.append(("torch device", 'none: the PyTorch backend needs pip install "mlxft[torch]"'))
    return lines


def format_report(lines: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in lines)
