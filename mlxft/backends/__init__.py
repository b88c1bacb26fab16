"""Backends: MLX (Apple Silicon, or its CPU backend elsewhere) and PyTorch (CUDA, MPS or CPU).

Both take the same numpy batches from mlxft.data, write the same run folder and answer to the
same functions; the CLI only picks one.
"""

from __future__ import annotations

import platform

from mlxft.errors import NotImplementedYet, UserError

BACKENDS = ("auto", "mlx", "torch")


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}'; use one of {', '.join(BACKENDS)}")
    if name == "torch":
        raise NotImplementedYet("the PyTorch backend is not implemented yet; use --backend mlx")
    if name == "auto":
        # Until the PyTorch backend lands, MLX is the only choice: Metal on Apple Silicon,
        # its CPU backend elsewhere.
        return "mlx"
    return name


def on_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"
