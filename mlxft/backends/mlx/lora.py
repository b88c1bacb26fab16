"""LoRA on MLX in PEFT's terms (r, alpha, dropout, target modules, layers), on mlx-lm's layers.

mlx-lm's LoRALinear keeps `lora_a` [in, r] and `lora_b` [r, out] and multiplies by `scale`;
PEFT keeps A [r, in], B [out, r] and scales by alpha / r. So scale = alpha / r, A = lora_a.T,
B = lora_b.T, and the initialisation (A uniform within ±1/sqrt(in), B zero) is the same.

DoRA (spec.use_dora) is mlx-lm's DoRALinear, whose `m` [out] is PEFT's lora_magnitude_vector: both
start it at the norm of each output row of W (over the input dimension) and divide by the same
row norms of W + scale * B @ A, held constant in the backward pass as the DoRA paper recommends.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from mlxft.models.adapters import AdapterSpec, check_swappable, select_modules


def linear_modules(model) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} for every linear layer inside the transformer blocks."""
    found = {}
    for path, module in model.named_modules():
        if ".layers." not in f".{path}" or isinstance(module, (LoRALinear, DoRALinear)):
            continue
        if isinstance(module, (nn.QuantizedLinear, nn.Linear)):
            found[path] = dims(module)
    return found


def dims(linear) -> tuple[int, int]:
    """(out, in) of a linear layer; a quantized one packs 32 // bits inputs into each weight entry."""
    out_dim, packed = linear.weight.shape
    return (out_dim, packed * 32 // linear.bits) if isinstance(linear, nn.QuantizedLinear) else (out_dim, packed)


def apply_lora(model, spec: AdapterSpec) -> list[str]:
    """Freeze the model and put LoRA layers on the chosen modules; only they train."""
    paths = select_modules(linear_modules(model), spec.target_modules, spec.layers)
    model.freeze()
    modules = dict(model.named_modules())
    layer = AdapterDoRALinear if spec.use_dora else AdapterLinear
    replacements = [
        (path, layer.from_base(modules[path], r=spec.r, dropout=spec.dropout, scale=spec.scaling))
        for path in paths
    ]
    model.update_modules(tree_unflatten(replacements))
    return paths


class AdapterLinear(LoRALinear):
    """mlx-lm's LoRALinear (same weights, initialisation and fuse), except that with scale 0 it is
    its base layer: DPO's reference switches the adapter off that way (adapter_off below), and the
    low-rank branch would still cost two products and an add per layer for nothing (measured:
    ~15% of a reference forward with LoRA on every linear layer of SmolLM-135M's shape). The
    scale is a Python number, read when mx.compile traces the call."""

    @staticmethod
    def from_base(linear, r: int = 8, dropout: float = 0.0, scale: float = 20.0) -> AdapterLinear:
        output_dims, input_dims = dims(linear)
        layer = AdapterLinear(input_dims=input_dims, output_dims=output_dims, r=r, dropout=dropout, scale=scale)
        layer.linear = linear
        return layer

    def __call__(self, x):
        if self.scale == 0:
            return self.linear(x)
        return super().__call__(x)


class AdapterDoRALinear(DoRALinear):
    """mlx-lm's DoRALinear (its `m`, norms and initialisation; quantized bases de-quantized for the
    norms) computing PEFT's function, and with scale 0 its plain base layer, not the base rescaled
    by m / ||W||: adapter off must be the base model whatever the magnitude learned. PEFT sends a
    dropped-out input through W as well when dropout is on in training (mlx-lm rescales the
    undropped base output instead), so the same recipe trains the same objective on both backends."""

    @staticmethod
    def from_base(linear, r: int = 8, dropout: float = 0.0, scale: float = 20.0) -> AdapterDoRALinear:
        output_dims, input_dims = dims(linear)
        layer = AdapterDoRALinear(input_dims=input_dims, output_dims=output_dims, r=r, dropout=dropout, scale=scale)
        layer.set_linear(linear)
        layer.dropout_p = dropout
        return layer

    def __call__(self, x):
        if self.scale == 0:
            return self.linear(x)
        weight = self._dequantized_weight()
        adapted = weight + (self.scale * self.lora_b.T) @ self.lora_a.T
        magnitude_scale = (self.m / mx.stop_gradient(mx.linalg.norm(adapted, axis=1))).astype(x.dtype)
        base = self.linear(x)
        if self.training and self.dropout_p > 0:
            x = self.dropout(x)
            plain = x @ weight.T
        else:
            plain = base - self.linear.bias if "bias" in self.linear else base
        update = (x @ self.lora_a) @ self.lora_b
        # PEFT's arithmetic, term for term: base + (m / norm - 1) * W x + (m / norm) * scale * B A x.
        return base + (magnitude_scale - 1) * plain + (magnitude_scale * update * self.scale).astype(x.dtype)


def is_dora(layer) -> bool:
    return isinstance(layer, DoRALinear)


def remove_lora(model) -> None:
    """Put the plain base layers back in place of the LoRA layers (their weights are shared,
    not copied), so another adapter can be applied to the same model."""
    layers = lora_layers(model)
    if layers:
        model.update_modules(tree_unflatten([(path, layer.linear) for path, layer in layers.items()]))


def lora_layers(model) -> dict[str, LoRALinear | DoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


def adapter_weights(model) -> dict[str, tuple[np.ndarray, ...]]:
    """{module path: (A [r, in], B [out, r]), and DoRA's magnitude m [out] third} in PEFT's
    orientation, as float32 numpy."""
    return {
        path: (np.array(m.lora_a.T.astype(mx.float32)), np.array(m.lora_b.T.astype(mx.float32)))
        + ((np.array(m.m.astype(mx.float32)),) if is_dora(m) else ())
        for path, m in lora_layers(model).items()
    }


def saved_modules(model, spec: AdapterSpec) -> dict[str, np.ndarray]:
    """{"score.weight": ...}: the modules trained in full beside the adapter (spec.modules_to_save)."""
    return {f"{name}.weight": np.array(getattr(model, name).weight.astype(mx.float32)) for name in spec.modules_to_save or ()}


def set_saved_modules(model, tensors: dict) -> None:
    """The inverse of saved_modules."""
    for key, value in tensors.items():
        module, _, name = key.rpartition(".")
        setattr(getattr(model, module), name, mx.array(value))


def set_adapter_weights(model, weights: dict) -> None:
    """Copy PEFT-oriented (A, B) tensors into the model's LoRA layers (lora_a = A.T, lora_b = B.T),
    and a DoRA magnitude where one is given (a DoRA layer keeps its own otherwise)."""
    layers = lora_layers(model)
    for path, tensors in weights.items():
        put_weights(layers[path], tensors)


def put_weights(layer, tensors) -> None:
    a, b, *magnitude = tensors
    layer.lora_a, layer.lora_b = mx.array(a.T), mx.array(b.T)
    if magnitude:
        layer.m = mx.array(magnitude[0])


def unfreeze_all(model) -> None:
    """Full fine-tuning: every weight trains."""
    model.unfreeze()


def trainable_parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def total_parameters(model) -> int:
    """Parameters as the unquantized model has them: a quantized layer's packed 32-bit words hold
    32 / bits weights each, and its scales and biases are not parameters of the model (a 4-bit
    SmolLM2-135M read as 21.5M before)."""
    quantized = {path: module for path, module in model.named_modules()
                 if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    total = 0
    for path, value in tree_flatten(model.parameters()):
        owner, _, name = path.rpartition(".")
        module = quantized.get(owner)
        if module is None:
            total += value.size
        elif name == "weight":
            total += value.size * 32 // module.bits
    return total


@contextmanager
def adapter_off(model):
    """The base model inside the adapted one: every LoRA layer's scale 0 and dropout off, then
    both put back. Inside mx.compile this holds while the function is traced, which is when
    these Python attributes are read (see the module docstring)."""
    layers = list(lora_layers(model).values())
    scales, training = [layer.scale for layer in layers], model.training
    for layer in layers:
        layer.scale = 0.0
    model.eval()
    try:
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale
        model.train(training)


@contextmanager
def adapter_swapped(model, weights: dict, scale: float):
    """Another adapter ({path: (A, B)}, or (A, B, m) on DoRA layers, in PEFT's orientation, any rank)
    in the LoRA layers for the length of a block, dropout off; the layers it does not adapt are
    their base layers (scale 0). The trained adapter's arrays are put back as they were: nothing
    is copied into them."""
    layers = lora_layers(model)
    check_swappable(weights, {p: (m.lora_b.shape[1], m.lora_a.shape[0]) for p, m in layers.items()}, "swapped in",
                    use_dora=any(map(is_dora, layers.values())))
    saved = {path: (layer.lora_a, layer.lora_b, layer.scale, getattr(layer, "m", None)) for path, layer in layers.items()}
    training = model.training
    for path, layer in layers.items():
        if path in weights:
            put_weights(layer, weights[path])
            layer.scale = scale
        else:
            layer.scale = 0.0
    model.eval()
    try:
        yield model
    finally:
        for path, (a, b, layer_scale, magnitude) in saved.items():
            layers[path].lora_a, layers[path].lora_b, layers[path].scale = a, b, layer_scale
            if magnitude is not None:
                layers[path].m = magnitude
        model.train(training)


def probe_logits(model, ids) -> np.ndarray:
    """Logits [B, T, V] as float32 numpy, in eval mode (no dropout); the mode is put back."""
    training = model.training
    model.eval()
    try:
        return np.array(model(mx.array(ids)).astype(mx.float32))
    finally:
        model.train(training)
