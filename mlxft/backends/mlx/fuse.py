"""`mlxft fuse`: merge a LoRA adapter into its base model, as a standalone Hugging Face folder
(config.json, model.safetensors, tokenizer files, generation_config.json) that mlx-lm,
transformers and mlxft load like any model.

    mlxft fuse --adapter runs/alpaca-20261121 --out models/alpaca-fused

Each adapted weight becomes W + (alpha / r) * B @ A, computed in float32 and cast back to the
base's dtype; with DoRA, that sum with each output row rescaled to its magnitude m (PEFT's merge).
A quantized base is de-quantized (the merged weights are then exact, with no second round of
quantization error) unless --quantize asks for a quantized output; with the base's own bit width,
only the merged layers are quantized again and the others stay as they were. Raises UserError for
a non-empty --out without force, an adapter that does not fit the base, or an adapter that names
no base model and no --model. Everything is written to a temporary folder and renamed at the end,
so a failed fuse leaves no output folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxft.backends.mlx import lora
from mlxft.errors import UserError
from mlxft.files import staged_folder
from mlxft.models.adapters import adapter_folder, apply_adapter, check_modules
from mlxft.models.fuse import Fused, adapter_and_base_name, check_out, check_sources, copy_model_files, fused_check
from mlxft.train.saved_check import fixed_probe, relative_difference

QUANTIZATION_KEYS = ("quantization", "quantization_config")
GROUP_SIZE = 64  # mlx-lm's default group size for newly quantized models


def fuse(adapter: str | Path, out: str | Path, *, model: str | None = None, quantize: int | None = None,
         force: bool = False, trust_remote_code: bool = False) -> Fused:
    from mlx_lm.utils import save_config, save_model

    from mlxft.backends.mlx.lora import linear_modules
    from mlxft.backends.mlx.model import load

    out = Path(out)
    check_out(out, force)
    if quantize not in (None, 4, 8):
        raise UserError(f"--quantize takes 4 or 8, not {quantize}")
    spec, weights, base_name = adapter_and_base_name(adapter, model)
    base, _, folder = load(base_name, trust_remote_code=trust_remote_code)
    check_sources(out, folder, adapter_folder(adapter))
    check_modules(weights, linear_modules(base), str(adapter))
    config = json.loads((folder / "config.json").read_text())
    ids = fixed_probe(base.args.vocab_size)
    apply_adapter(lora, base, spec, weights, str(adapter))
    adapted = lora.probe_logits(base, ids)  # what was trained: base + adapter, unfused
    lora.remove_lora(base)

    requantize = merge_adapter(base, weights, spec.scaling)
    config = set_output_quantization(base, config, requantize, quantize)
    with staged_folder(out) as staging:
        save_model(staging, base)
        save_config(config, staging / "config.json")
        copy_model_files(folder, staging, config)
        check = check_fused(staging, adapted, ids, config.get("quantization"), base.model.embed_tokens.weight.dtype)
    return Fused(out, base_name, len(weights), config.get("quantization"), check)


# mlx's dtypes under the names every backend's check uses (mlxft.models.fuse.FUSE_TOLERANCE).
DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}


def check_fused(folder: Path, adapted, ids, quantization: dict | None, dtype) -> dict:
    from mlxft.backends.mlx.model import load

    fused, _, _ = load(str(folder))
    relative = relative_difference(lora.probe_logits(fused, ids), adapted)
    return fused_check(relative, len(ids[0]), DTYPE_NAMES.get(dtype, str(dtype)), quantization)


def merge_adapter(model, weights: dict, scale: float) -> list[str]:
    """Replace each adapted layer by a full-precision Linear holding W + scale * B @ A (DoRA: see
    merged_weight), computed in float32 and cast to the base dtype; returns the paths of those
    that were quantized before."""
    modules = dict(model.named_modules())
    replacements, were_quantized = [], []
    for path, tensors in weights.items():
        layer = modules[path]
        weight = dense_weight(layer)
        merged = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in layer)
        merged.weight = merged_weight(weight.astype(mx.float32), scale, *tensors).astype(weight.dtype)
        if "bias" in layer:
            merged.bias = layer.bias
        replacements.append((path, merged))
        if isinstance(layer, nn.QuantizedLinear):
            were_quantized.append(path)
    model.update_modules(tree_unflatten(replacements))
    mx.eval(model.parameters())
    return were_quantized


def merged_weight(weight, scale: float, a, b, magnitude=None) -> mx.array:
    """W + scale * B @ A; for DoRA, each output row of it rescaled to the magnitude m [out]:
    m * (W + scale * B @ A) / ||W + scale * B @ A||, the norm of each row over the inputs."""
    merged = weight + scale * (mx.array(b, dtype=mx.float32) @ mx.array(a, dtype=mx.float32))
    if magnitude is None:
        return merged
    return (mx.array(magnitude, dtype=mx.float32) / mx.linalg.norm(merged, axis=1))[:, None] * merged


def dense_weight(layer) -> mx.array:
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, getattr(layer, "biases", None), group_size=layer.group_size,
                             bits=layer.bits, mode=layer.mode)
    return layer.weight


def set_output_quantization(model, config: dict, requantize: list[str], bits: int | None) -> dict:
    """Bring the merged model to the requested precision; returns the config that describes it."""
    from mlx_lm.utils import dequantize_model, quantize_model

    base = config.get("quantization")
    if bits is not None and base and base.get("bits") == bits:
        # Same width as the base: re-quantize only what was merged, with the base's own settings,
        # so the untouched layers carry no second round of quantization error.
        group_size, mode = base["group_size"], base.get("mode", "affine")
        nn.quantize(model, group_size, bits, mode=mode, class_predicate=lambda path, _: path in requantize)
        return config
    config = dict(config)
    if base:
        dequantize_model(model)
        for key in QUANTIZATION_KEYS:
            config.pop(key, None)
    if bits is not None:
        model, config = quantize_model(model, config, group_size=GROUP_SIZE, bits=bits)
    return config
