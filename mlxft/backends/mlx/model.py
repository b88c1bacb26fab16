"""Load a model for training or evaluation on MLX, through mlx-lm's loader.

The folder comes from mlxft.model_files (built-in, local or hub), so the PyTorch backend reads
the very same files. A quantized MLX model (mlx-community 4-bit) loads as it is; `quantize`
quantizes a full-precision one on load. Either way LoRA on top of it is QLoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxft.errors import UserError
from mlxft.model_files import TOKENIZER_FILES, resolve_model_dir

# Model families whose mlx-lm class is `model.model` (the transformer) plus a plain head, so the
# head can run on the scored positions only. Others fall back to full logits. (Not granite: its
# mlx-lm class divides the logits by `logits_scaling` after the head.)
SPLIT_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"}


def load(name: str, *, quantize: int | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, folder) for a model name; one-line errors for what users get wrong."""
    from mlx_lm.utils import load as mlx_lm_load
    from mlx_lm.utils import quantize_model

    folder = resolve_model_dir(name)
    if not (folder / "config.json").exists():
        raise UserError(f"model {folder}: no config.json (not a Hugging Face model folder)")
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"model {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if not list(folder.glob("*.safetensors")):
        raise UserError(f"model {folder}: no *.safetensors weights")
    try:
        model, tokenizer, config = mlx_lm_load(str(folder), return_config=True, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UserError(f"model {folder}: mlx-lm cannot load it ({str(e).splitlines()[0]})") from None
    if quantize:
        if quantize not in (4, 8):
            raise UserError(f"--quantize takes 4 or 8, not {quantize}")
        if "quantization" in config:
            raise UserError(f"model {folder} is already quantized; drop --quantize")
        model, _ = quantize_model(model, config, group_size=64, bits=quantize)
    return model, tokenizer, folder


def model_type(folder: Path) -> str:
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")


def logits_at(model, inputs: mx.array, positions: mx.array, split_head: bool) -> mx.array:
    """Logits [B, K, V] for the outputs at `positions` [B, K] only."""
    if not split_head:
        return mx.take_along_axis(model(inputs), positions[..., None], axis=1)
    hidden = model.model(inputs)
    hidden = mx.take_along_axis(hidden, positions[..., None], axis=1)
    if getattr(model, "lm_head", None) is not None and not model.args.tie_word_embeddings:
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def can_split_head(model, folder: Path) -> bool:
    return model_type(folder) in SPLIT_HEAD_TYPES and hasattr(model, "model") and hasattr(model, "args")


def token_losses(model, inputs, positions, tokens, weights, split_head: bool) -> tuple[mx.array, mx.array]:
    """(sum of token cross-entropies, number of scored tokens) for one micro-batch."""
    logits = logits_at(model, inputs, positions, split_head).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, tokens) * weights
    return losses.sum(), weights.sum()


def configure_memory() -> None:
    """On Metal, what mlx-lm does for unified memory: wire the recommended working set so
    weights are not paged out mid-step. Nothing to do on the CPU backend."""
    if not mx.metal.is_available():
        return
    info = mx.device_info()
    limit = info.get("max_recommended_working_set_size")
    if limit:
        mx.set_wired_limit(limit)


CACHE_LIMIT_FRACTION = 0.25  # of the recommended working set


def trim_cache() -> None:
    """On Metal, give cached buffers back once the cache outgrows a share of the working set,
    as mlx-lm's trainer does: with unified memory they are memory the system cannot use."""
    if not mx.metal.is_available():
        return
    limit = mx.device_info().get("max_recommended_working_set_size", 0) * CACHE_LIMIT_FRACTION
    if limit and mx.get_cache_memory() > limit:
        mx.clear_cache()


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9
