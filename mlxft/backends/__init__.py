"""Backends: MLX (Apple Silicon, or its CPU backend elsewhere) and PyTorch (CUDA, MPS or CPU).

Both take the same numpy batches from mlxft.data, write the same run folder and answer to the
same functions; the CLI only picks one.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
from pathlib import Path

from mlxft.errors import UserError

BACKENDS = ("auto", "mlx", "torch")
TORCH_HINT = 'the PyTorch backend needs torch, transformers and peft: pip install "mlxft[torch]"'


def resolve_backend(name: str) -> str:
    """'mlx' or 'torch' for a --backend value; a UserError when the choice cannot run here."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}'; use one of {', '.join(BACKENDS)}")
    if name == "torch":
        if not torch_available():
            raise UserError(TORCH_HINT)
        return "torch"
    if name == "auto":
        if on_apple_silicon():
            return "mlx"
        if nvidia_driver_present() and torch_available():
            import torch

            if torch.cuda.is_available():
                return "torch"
        # Elsewhere (a CPU-only host) MLX's CPU backend, until a measurement says which is faster.
        return "mlx"
    return name


def nvidia_driver_present() -> bool:
    """Cheap first look, so a CPU-only host does not pay seconds of `import torch` to learn it has no GPU."""
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def torch_available() -> bool:
    try:
        import torch  # noqa: F401  (an import, not a spec lookup: a broken install must count as missing)
    except ImportError:
        return False
    return all(_installed(name) for name in ("transformers", "peft"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules: deliberately unavailable
        return False


def on_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"
