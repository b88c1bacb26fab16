"""Checkpoints and saved weights of the PyTorch trainers: an adapter in PEFT's layout (or a whole
model folder for full fine-tuning), MLXAdamW's moments and the step, written into a staging
folder and swapped in whole, so a kill leaves the previous checkpoint or the new one.

    checkpoint/weights/  optimizer.safetensors  state.json {step, best, stale, backend: "torch", progress}
    [heads.safetensors]

`progress` is the run driver's: the tokens trained and the open report window (mlxft.driver).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mlxft.adapters import load_adapter, load_saved_modules, save_adapter
from mlxft.backends.torch import lora
from mlxft.backends.torch import model as torch_model
from mlxft.errors import UserError
from mlxft.files import staged_folder
from mlxft.model_files import TOKENIZER_OUTPUTS


def save_weights(folder: Path, model, spec, config, base_folder) -> None:
    """The adapter in PEFT layout, or for full fine-tuning a whole model folder."""
    if not config.lora.full_finetune:
        save_adapter(folder, spec, lora.adapter_weights(model), lora.saved_modules(model, spec))
        return
    with staged_folder(folder) as staging:
        with torch_model.quiet_progress():
            model.save_pretrained(staging, safe_serialization=True)  # knows tied weights and shards
        # The base's own config.json, as on MLX: transformers 5 rewrites rope settings in a form
        # that mlx-lm and older transformers do not read, and the folder must load on both.
        for name in ("config.json", "generation_config.json", *TOKENIZER_OUTPUTS):
            if (Path(base_folder) / name).exists():
                shutil.copy(Path(base_folder) / name, staging / name)


def save(run, model, optimizer, named, spec, config, base_folder, step, best, stale, progress=None, heads=None) -> None:
    """Weights, optimizer state and the step, written to a new folder and swapped in whole; `heads`:
    tensors trained beside the adapter that it does not carry (PPO's value head), in
    heads.safetensors. No RNG state: dropout is seeded from the step, and the batch order from
    (seed, epoch)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, p in named.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"{name}.{key}"] = value.contiguous() if torch.is_tensor(value) else torch.tensor(value)
    with staged_folder(run.checkpoint_dir) as staging:
        save_weights(staging / "weights", model, spec, config, base_folder)
        save_file({k: v.cpu() for k, v in tensors.items()}, str(staging / "optimizer.safetensors"))
        if heads:
            save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, str(staging / "heads.safetensors"))
        (staging / "state.json").write_text(json.dumps({"step": step, "best": best, "stale": stale, "backend": "torch",
                                                               "progress": progress}))


def load(run, model, optimizer, named, full_finetune: bool, trust_remote_code: bool) -> tuple[int, dict | None, int]:
    """The checkpoint's weights into `model` and its moments into `optimizer`: (step, best, stale)."""
    from safetensors.torch import load_file

    folder = run.checkpoint_dir
    state = run.checkpoint_state()
    written_by = state["backend"]
    if written_by != "torch":
        raise UserError(f"--resume {run.folder}: its checkpoint was written by the {written_by} backend; "
                        f"resume it with --backend {written_by}")
    device = next(model.parameters()).device
    if full_finetune:
        from transformers import AutoModelForCausalLM

        # Read back through transformers, which undoes whatever key mapping save_pretrained applied.
        with torch_model.quiet_progress():
            saved = AutoModelForCausalLM.from_pretrained(str(folder / "weights"), dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code)
        model.load_state_dict(saved.state_dict())
    else:
        lora.set_adapter_weights(model, load_adapter(folder / "weights", task_type=None)[1])
        lora.set_saved_modules(model, load_saved_modules(folder / "weights"))
    moments = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    for name, p in named.items():
        if f"{name}.m" in moments:
            optimizer.state[p] = {"step": int(moments[f"{name}.step"]), "m": moments[f"{name}.m"], "v": moments[f"{name}.v"]}
    return state["step"], state["best"], state["stale"]


def load_heads(run, device) -> dict:
    """The checkpoint's heads.safetensors (see save), or {} when it has none."""
    from safetensors.torch import load_file

    path = run.checkpoint_dir / "heads.safetensors"
    return load_file(str(path), device=str(device)) if path.exists() else {}
