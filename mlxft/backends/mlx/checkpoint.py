"""Checkpoints and saved weights of the MLX trainers: an adapter in PEFT's layout (or a whole
model folder for full fine-tuning), the optimizer's moments and the step, written into a staging
folder and swapped in whole, so a kill leaves the previous checkpoint or the new one.

    checkpoint/weights/  optimizer.safetensors  state.json {step, best, stale, backend: "mlx", progress}
    [heads.safetensors]

`progress` is the run driver's: the tokens trained and the open report window (mlxft.train.driver).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.backends.mlx import lora
from mlxft.files import staged_folder
from mlxft.models.adapters import load_adapter, load_saved_modules, save_trained


def save_weights(folder: Path, model, spec, config, base_folder) -> None:
    """The adapter in PEFT layout, or for full fine-tuning a whole model folder (mlxft.models.adapters.save_trained)."""
    from mlx_lm.utils import save_model

    save_trained(folder, model, spec, config, base_folder, lora, lambda staging: save_model(staging, model))


def save(run, model, optimizer, spec, config, base_folder, step, best, stale, progress=None, heads=None) -> None:
    """Weights, optimizer state and the step, written to a new folder and swapped in whole; `heads`:
    arrays trained beside the adapter that it does not carry (PPO's value head), in heads.safetensors."""
    with staged_folder(run.checkpoint_dir) as staging:
        save_weights(staging / "weights", model, spec, config, base_folder)
        if heads:
            mx.save_safetensors(str(staging / "heads.safetensors"), heads)
        mx.save_safetensors(str(staging / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (staging / "state.json").write_text(json.dumps({"step": step, "best": best, "stale": stale, "backend": "mlx",
                                                               "progress": progress}))


def load(run, model, optimizer, full_finetune: bool) -> tuple[int, dict | None, int]:
    """The checkpoint's weights into `model` and its moments into `optimizer`: (step, best, stale)."""
    folder = run.checkpoint_dir
    if full_finetune:
        weights = mx.load(str(folder / "weights" / "model.safetensors"))
        model.load_weights(list(weights.items()))
    else:
        lora.set_adapter_weights(model, load_adapter(folder / "weights", task_type=None)[1])
        lora.set_saved_modules(model, load_saved_modules(folder / "weights"))
    return load_optimizer(run, model, optimizer)


def load_optimizer(run, model, optimizer) -> tuple[int, dict | None, int]:
    """The optimizer's moments alone, for a trainer that loaded the weights itself."""
    state = run.checkpoint_state()
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(run.checkpoint_dir / "optimizer.safetensors")).items()))
    return state["step"], state["best"], state["stale"]


def load_heads(run) -> dict:
    """The checkpoint's heads.safetensors (see save), or {} when it has none."""
    path = run.checkpoint_dir / "heads.safetensors"
    return mx.load(str(path)) if path.exists() else {}
