"""Backends: MLX (Apple Silicon, or its CPU backend elsewhere) and PyTorch (CUDA, MPS or CPU).

Both take the same numpy batches from mlxft.data, write the same run folder and keep the same
contract (mlxft.backends.engine), which the methods (mlxft.methods) are written against; the CLI
only picks one.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from mlxft.errors import NotImplementedYet, UserError

BACKENDS = ("auto", "mlx", "torch")
TORCH_HINT = 'the PyTorch backend needs torch, transformers and peft: pip install "mlxft[torch]"'


def resolve_backend(name: str, *, supports: tuple[str, ...] = ("mlx", "torch"), quantized: bool = False) -> str:
    """'mlx' or 'torch' for a --backend value; a UserError when the choice cannot run here.

    `supports` names the backends the command has; `quantized` says the model is (or will be)
    quantized, which PyTorch can train only on CUDA (bitsandbytes).
    """
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}'; use one of {', '.join(BACKENDS)}")
    if name != "auto":
        if name not in supports:
            raise NotImplementedYet(f"this command runs on the {' and '.join(supports)} backend only for now; "
                                    f"use --backend {supports[0]}")
        if name == "torch" and not torch_available():
            raise UserError(TORCH_HINT)
        return name
    if on_apple_silicon() or "torch" not in supports or not torch_available():
        return "mlx"
    import torch

    if torch.cuda.is_available():
        return "torch"
    # A CPU-only host: PyTorch too. Measured on 2 x86 cores, the built-in model's tallrec step,
    # one thread each, same losses: PyTorch 11,600 tokens/s, MLX's CPU backend 4,100-6,700 (its
    # CPU path runs op by op; PyTorch's CPU kernels are tuned for it). Quantized models stay on
    # MLX, which trains them on any device; PyTorch needs CUDA for that.
    return "mlx" if quantized else "torch"


def engine_for(name: str):
    """The one dispatch: a resolved backend name ('mlx' or 'torch', see resolve_backend) -> its
    engine (mlxft.backends.engine.Engine). Imported here, not at the top: each pulls in its framework."""
    if name == "mlx":
        from mlxft.backends.mlx.engine import MLXEngine

        return MLXEngine()
    if name == "torch":
        from mlxft.backends.torch.engine import TorchEngine

        return TorchEngine()
    raise UserError(f"no backend '{name}'; resolve --backend first (mlx or torch)")


def is_mlx_quantized(model_name: str | None) -> bool:
    """A model the PyTorch backend cannot load: an MLX-quantized folder (its config.json has a
    `quantization` section) or an mlx-community hub id. Cheap: reads no weights, downloads nothing."""
    if not model_name:
        return False
    if model_name.startswith("mlx-community/"):
        return True
    config = Path(model_name).expanduser() / "config.json"
    try:
        import json

        return "quantization" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


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
