"""`mlxft fuse --backend torch`: merge a LoRA (or DoRA) adapter into its base model with PEFT, as
the same standalone Hugging Face folder the MLX fuse writes (weights in the base's own dtype, the
base's config.json, tokenizer files, chat template, generation_config.json), which transformers,
mlx-lm and mlxft load like any model.

    mlxft fuse --backend torch --adapter runs/alpaca-20261121 --out models/alpaca-fused

The adapter is put on the base through PEFT and each LoRA layer merged by PEFT itself (what
merge_and_unload does, layer by layer: mlxft injects PEFT's layers into the transformers model,
so there is no PeftModel to call it on), in float32, then cast to the dtype the base was stored
in. The folder is loaded back and checked against base + adapter on a probe batch before it is
kept, with the MLX fuse's tolerances; it is written to a temporary folder and renamed at the end.
--quantize is not implemented on this backend (NotImplementedYet); an MLX-quantized base does not
load here (UserError: use --backend mlx).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlxft.backends.torch import lora
from mlxft.errors import NotImplementedYet
from mlxft.files import staged_folder
from mlxft.models.adapters import adapter_folder, apply_adapter, check_modules
from mlxft.models.fuse import Fused, adapter_and_base_name, check_out, check_sources, copy_model_files, fused_check
from mlxft.train.saved_check import fixed_probe, relative_difference

# safetensors' names for the float dtypes a base may be stored in.
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def fuse(adapter: str | Path, out: str | Path, *, model: str | None = None, quantize: int | None = None,
         force: bool = False, trust_remote_code: bool = False) -> Fused:
    from mlxft.backends.torch.model import load, quiet_progress

    out = Path(out)
    check_out(out, force)
    if quantize is not None:
        raise NotImplementedYet("--quantize is not implemented on the PyTorch backend yet; fuse in full precision, "
                                "or use --backend mlx for a 4- or 8-bit fused model")
    spec, weights, base_name = adapter_and_base_name(adapter, model)
    base, _, folder = load(base_name, trust_remote_code=trust_remote_code)
    check_sources(out, folder, adapter_folder(adapter))
    check_modules(weights, lora.linear_modules(base), str(adapter))
    config = json.loads((folder / "config.json").read_text())
    ids = fixed_probe(base.config.vocab_size)
    apply_adapter(lora, base, spec, weights, str(adapter))
    adapted = lora.probe_logits(base, ids)  # what was trained: base + adapter, unfused
    merge_adapter(base)
    dtype = stored_dtype(folder)
    base.to(dtype)
    with staged_folder(out) as staging:
        with quiet_progress():
            base.save_pretrained(staging)
        # The base's own config, as the MLX fuse keeps it: transformers would rewrite it in its
        # current version's spelling, which older transformers and mlx-lm may not read.
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        copy_model_files(folder, staging, config)
        check = check_fused(staging, adapted, ids, dtype, trust_remote_code)
    return Fused(out, base_name, len(weights), None, check)


def merge_adapter(model) -> None:
    """PEFT's merge of every LoRA layer into its base layer (W + scaling * B @ A; DoRA's rows
    rescaled to their magnitudes), then the plain base layers put back in their place."""
    for layer in lora.lora_layers(model).values():
        layer.merge(safe_merge=True)  # refuses a merge that yields NaN or inf
    lora.remove_lora(model)


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the base's weights are stored in: the first safetensors file's, else the config's,
    else float32."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "np") as handle:
            for key in handle.keys():
                dtype = STORED_DTYPES.get(handle.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if name in ("float32", "bfloat16", "float16") else torch.float32


def check_fused(folder: Path, adapted, ids, dtype: torch.dtype, trust_remote_code: bool) -> dict:
    from mlxft.backends.torch.model import load

    fused, _, _ = load(str(folder), trust_remote_code=trust_remote_code)
    relative = relative_difference(lora.probe_logits(fused, ids), adapted)
    return fused_check(relative, len(ids[0]), str(dtype).removeprefix("torch."), None)
