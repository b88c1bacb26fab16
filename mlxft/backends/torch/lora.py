"""LoRA on PyTorch through PEFT, from the same AdapterSpec the MLX backend uses.

PEFT's own layout is the on-disk format (mlxft.models.adapters), so nothing is transposed here: a LoRA
layer's lora_A.weight is A [r, in] and lora_B.weight is B [out, r], scaled by alpha / r. PEFT
initialises A as kaiming_uniform(a=sqrt(5)), i.e. uniform within ±1/sqrt(in), and B as zero:
the same distribution as mlx-lm's LoRALinear, so a new adapter starts as a no-op on both. DoRA
(spec.use_dora) is PEFT's own: its lora_magnitude_vector[ADAPTER].weight is the magnitude m [out].

Functions take the transformers model itself; PEFT injects its layers into it in place, so the
module paths ("model.layers.0.self_attn.q_proj") are the adapter file's paths without the
"base_model.model." prefix.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from mlxft.models.adapters import AdapterSpec, check_swappable, layer_index, select_modules

ADAPTER = "default"  # PEFT's adapter name; mlxft keeps one adapter per model


def _is_lora(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def linear_modules(model) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} for every linear layer inside the transformer blocks."""
    found = {}
    for path, module in model.named_modules():
        if ".layers." not in f".{path}" or _is_lora(module) or ".lora_" in path or ".base_layer" in path:
            continue
        if isinstance(module, nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear too
            found[path] = (module.out_features, module.in_features)
    return found


def apply_lora(model, spec: AdapterSpec) -> list[str]:
    """Freeze the model and inject LoRA layers on the chosen modules; only they train."""
    from peft import LoraConfig, inject_adapter_in_model

    paths = select_modules(linear_modules(model), spec.target_modules, spec.layers)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), layers_to_transform=spec.layers,
                        layers_pattern="layers" if spec.layers is not None else None, bias="none",
                        use_rslora=spec.use_rslora, use_dora=spec.use_dora)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # leaves only A, B (and DoRA's m) trainable
    injected = sorted(lora_layers(model), key=lambda p: (layer_index(p), p))
    if injected != paths:  # PEFT's matching and ours must agree, or the file would name other modules
        raise RuntimeError(f"PEFT adapted {injected}, expected {paths}")
    return paths


def remove_lora(model) -> None:
    """Put the plain base layers back in place of the LoRA layers (the same modules, not
    copies), so another adapter can be applied to the same model."""
    for path, layer in lora_layers(model).items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, layer.get_base_layer())
    if hasattr(model, "peft_config"):  # left by inject_adapter_in_model; a second injection warns about it
        del model.peft_config


def lora_layers(model) -> dict:
    return {path: m for path, m in model.named_modules() if _is_lora(m) and ADAPTER in m.lora_A}


def is_dora(layer) -> bool:
    return ADAPTER in layer.lora_magnitude_vector


def adapter_tensors(layer) -> list:
    """A layer's trained tensors in the order of the adapter format: A, B, and DoRA's magnitude."""
    return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
            *([layer.lora_magnitude_vector[ADAPTER].weight] if is_dora(layer) else [])]


def adapter_weights(model) -> dict[str, tuple[np.ndarray, ...]]:
    """{module path: (A [r, in], B [out, r]), and DoRA's magnitude m [out] third} as float32 numpy,
    for mlxft.models.adapters.save_adapter."""
    return {path: tuple(t.detach().float().cpu().numpy() for t in adapter_tensors(m))
            for path, m in lora_layers(model).items()}


def saved_modules(model, spec: AdapterSpec) -> dict[str, np.ndarray]:
    """{"score.weight": ...}: the modules trained in full beside the adapter (spec.modules_to_save)."""
    return {f"{name}.weight": getattr(model, name).weight.detach().float().cpu().numpy() for name in spec.modules_to_save or ()}


@torch.no_grad()
def set_saved_modules(model, tensors: dict) -> None:
    """The inverse of saved_modules."""
    for key, value in tensors.items():
        target = model.get_parameter(key)
        target.copy_(torch.as_tensor(np.asarray(value), dtype=target.dtype))


@torch.no_grad()
def set_adapter_weights(model, weights: dict) -> None:
    """Copy PEFT-oriented (A, B) numpy tensors into the model's LoRA layers, and a DoRA magnitude
    where one is given (a DoRA layer keeps its own otherwise)."""
    layers = lora_layers(model)
    for path, values in weights.items():
        for target, value in zip(adapter_tensors(layers[path]), values):
            target.copy_(torch.as_tensor(np.asarray(value), dtype=target.dtype))


def unfreeze_all(model) -> None:
    """Full fine-tuning: every weight trains."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # tied weights count once


def total_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def adapter_swapped(model, weights: dict, scale: float):
    """Another adapter ({path: (A, B)}, or (A, B, m) on DoRA layers, any rank) in the LoRA layers for
    the length of a block, dropout off; the layers it does not adapt are their base layers (adapter
    disabled: scaling 0 would leave a DoRA layer's m / ||W|| rescaling). The trained adapter's
    tensors are put back as they were (the same storage: the optimizer's references hold)."""
    layers = lora_layers(model)
    check_swappable(weights, {p: (m.lora_B[ADAPTER].weight.shape[0], m.lora_A[ADAPTER].weight.shape[1])
                              for p, m in layers.items()}, "swapped in", use_dora=any(map(is_dora, layers.values())))
    saved = {path: ([t.data for t in adapter_tensors(layer)], layer.scaling[ADAPTER]) for path, layer in layers.items()}
    trainable = {p: p.requires_grad for layer in layers.values() for p in adapter_tensors(layer)}
    training = model.training
    with torch.no_grad():
        for path, layer in layers.items():
            if path in weights:
                for target, value in zip(adapter_tensors(layer), weights[path]):
                    target.data = torch.as_tensor(np.asarray(value), dtype=target.dtype, device=target.device)
                layer.scaling[ADAPTER] = scale
            else:
                layer.enable_adapters(False)
    model.eval()
    try:
        yield model
    finally:
        for path, (tensors, layer_scale) in saved.items():
            for target, value in zip(adapter_tensors(layers[path]), tensors):
                target.data = value
            layers[path].scaling[ADAPTER] = layer_scale
            if path not in weights:
                layers[path].enable_adapters(True)
        for parameter, flag in trainable.items():  # enable_adapters(True) makes them all trainable
            parameter.requires_grad_(flag)
        model.train(training)


@contextmanager
def adapter_off(model):
    """The base model inside the adapted one, as PEFT's `with model.disable_adapter():` gives it
    (each LoRA layer's enable_adapters(False): it returns its base layer's output), and with
    dropout off; both put back afterwards. mlxft injects its LoRA layers into the transformers
    model itself, so there is no PeftModel to call disable_adapter on."""
    layers = list(lora_layers(model).values())
    training = model.training
    for layer in layers:
        layer.enable_adapters(False)
    model.eval()
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # PEFT also marks the adapter's weights trainable again here
        model.train(training)


@torch.no_grad()
def probe_logits(model, ids) -> np.ndarray:
    """Logits [B, T, V] as float32 numpy, in eval mode (no dropout); the mode is put back."""
    training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return model(torch.tensor(ids, device=device)).logits.float().cpu().numpy()
    finally:
        model.train(training)
