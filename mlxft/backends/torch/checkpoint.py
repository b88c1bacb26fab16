"""PyTorch's checkpoints, in the MLX checkpoint's layout (mlxft.backends.mlx.checkpoint), with
"backend": "torch" in state.json and MLXAdamW's moments keyed by parameter name. A run resumes
on the backend that wrote it.

Weights sharded across ranks (train.fsdp) are saved whole, as one process saves them: every rank
calls save_weights and save, which gather each tensor from all of them, and rank 0 alone writes.
Loading gives each rank its shard of the whole tensors again, so a run resumes with any number
of ranks.
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


def is_sharded(model) -> bool:
    """Whether FSDP holds the model's weights as shards (DTensors) across ranks."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def writes() -> bool:
    """Whether this process writes files: rank 0, or the only one."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def whole_state(model) -> dict | None:
    """The sharded model's weights gathered whole onto rank 0's CPU ({} on the other ranks), or
    None when the model is not sharded: a collective, every rank calls it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied weight (the head and the embeddings) comes back twice, as two tensors: keep it once,
    # under its first name, as save_pretrained does for the model itself.
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def save_weights(folder: Path, model, spec, config, base_folder, state: dict | None = None) -> None:
    """The adapter in PEFT layout, or for full fine-tuning a whole model folder (mlxft.models.adapters.save_trained);
    sharded weights are gathered first (`state`, when the caller has)."""
    state = state if state is not None else (whole_state(model) if config.lora.full_finetune else None)
    if not writes():
        return

    def write_model(staging: Path) -> None:
        with torch_model.quiet_progress():  # save_pretrained knows tied weights and shards
            model.save_pretrained(staging, safe_serialization=True, **({"state_dict": state} if state is not None else {}))

    save_trained(folder, model, spec, config, base_folder, lora, write_model)


def save(run, model, optimizer, named, spec, config, base_folder, step, best, stale, progress=None, heads=None) -> None:
    """Weights, optimizer state and the step, written to a new folder and swapped in whole; `heads`:
    tensors trained beside the adapter that it does not carry (PPO's value head), in
    heads.safetensors. No RNG state: dropout is seeded from the step, and the batch order from
    (seed, epoch)."""
    from safetensors.torch import save_file

    from mlxft.backends.torch.steps import whole

    tensors = {}
    for name, p in named.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"{name}.{key}"] = whole(value).contiguous() if torch.is_tensor(value) else torch.tensor(value)
    state = whole_state(model) if config.lora.full_finetune else None
    if not writes():
        return
    with staged_folder(run.checkpoint_dir) as staging:
        save_weights(staging / "weights", model, spec, config, base_folder, state)
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
        if is_sharded(model):  # each rank keeps its shard of the whole tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(saved.state_dict())
    else:
        lora.set_adapter_weights(model, load_adapter(folder / "weights", task_type=None)[1])
        lora.set_saved_modules(model, load_saved_modules(folder / "weights"))
    moments = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    for name, p in named.items():
        if f"{name}.m" in moments:
            m, v = moments[f"{name}.m"], moments[f"{name}.v"]
            if hasattr(p, "device_mesh"):  # this rank's shard of each moment, as of its weight
                from torch.distributed.tensor import distribute_tensor

                m, v = (distribute_tensor(t, p.device_mesh, p.placements) for t in (m, v))
            optimizer.state[p] = {"step": int(moments[f"{name}.step"]), "m": m, "v": v}
    return state["step"], state["best"], state["stale"]


def load_heads(run, device) -> dict:
    """The checkpoint's heads.safetensors (see save), or {} when it has none."""
    from safetensors.torch import load_file

    path = run.checkpoint_dir / "heads.safetensors"
    return load_file(str(path), device=str(device)) if path.exists() else {}
