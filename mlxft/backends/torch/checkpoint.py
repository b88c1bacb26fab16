"""PyTorch's checkpoints, in the MLX checkpoint's layout (mlxft.backends.mlx.checkpoint), with
"backend": "torch" in state.json and MLXAdamW's moments keyed by parameter name. A run resumes
on the backend that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlxft.backends.torch import lora
from mlxft.backends.torch import model as torch_model
from mlxft.errors import UserError
from mlxft.files import staged_folder
from mlxft.models.adapters import load_adapter, load_saved_modules, save_trained


def save_weights(folder: Path, model, spec, config, base_folder) -> None:
    """The adapter in PEFT layout, or for full fine-tuning a whole model folder (mlxft.models.adapters.save_trained)."""

    def write_model(staging: Path) -> None:
        with torch_model.quiet_progress():
            model.save_pretrained(staging, safe_serialization=True)  # knows tied weights and shards

    save_trained(folder, model, spec, config, base_folder, lora, write_model)


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
