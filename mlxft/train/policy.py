"""The weights a run trains, set up the same way by every trainer on every backend: all of them
(full fine-tuning), a continued adapter (--adapter, or a resumed run's checkpoint), or a new LoRA
adapter from the recipe. `backend` is a backend's engine (mlxft.backends.engine): its model and lora modules.
"""

from __future__ import annotations

from mlxft.config import RunConfig
from mlxft.errors import UserError
from mlxft.models.adapters import AdapterSpec, attach_adapter, resolve_targets
from mlxft.models.files import BUILTIN


def recipe_spec(config: RunConfig, folder, linear_modules: dict) -> AdapterSpec:
    """The adapter the recipe asks for on a model whose block linear layers are `linear_modules`
    (a target preset resolved to layer names); the built-in model is named by its folder, so that
    the adapter's base_model_name_or_path loads anywhere."""
    lc = config.lora
    base_name = str(folder) if config.model.name == BUILTIN else config.model.name
    return AdapterSpec(lc.r, lc.alpha, lc.dropout, resolve_targets(lc.target_modules, linear_modules), base_name,
                       lc.layers, use_rslora=lc.use_rslora, use_dora=lc.use_dora)


def build_policy(backend, model, config: RunConfig, folder, *, start_from=None, task_type: str | None = "CAUSAL_LM") -> AdapterSpec:
    """Make `model` trainable as the run says and return the adapter's spec. `start_from`: an
    adapter to continue (its own spec replaces the recipe's: a continued adapter keeps its modules)
    of `task_type` (None: any), or None for a new one; ignored for full fine-tuning, whose checkpoint the backend loads."""
    spec = recipe_spec(config, folder, backend.lora.linear_modules(model))
    if config.lora.full_finetune:
        if config.model.quantize or backend.model.is_quantized(model):
            raise UserError("full fine-tuning needs a full-precision model; use LoRA on a quantized one")
        backend.lora.unfreeze_all(model)
    elif start_from:
        spec = attach_adapter(backend.lora, model, start_from, task_type)
    else:
        backend.lora.apply_lora(model, spec)
    if config.train.grad_checkpoint:
        backend.model.enable_gradient_checkpointing(model, 0.0 if config.lora.full_finetune else spec.dropout)
    return spec


def describe_policy(backend, model, folder, spec: AdapterSpec, config: RunConfig, where: str = "") -> tuple[int, str]:
    """(trainable parameters, the line that says what trains)."""
    trainable, total = backend.lora.trainable_parameters(model), backend.lora.total_parameters(model)
    what = ("full fine-tuning" if config.lora.full_finetune
            else f"LoRA r={spec.r} alpha={spec.alpha:g}{' (rsLoRA)' if spec.use_rslora else ''}{' (DoRA)' if spec.use_dora else ''} on "
                 f"{len(backend.lora.lora_layers(model))} modules")
    return trainable, f"model {folder} ({total / 1e6:.2f}M parameters){where}; training {trainable:,} ({what})"
