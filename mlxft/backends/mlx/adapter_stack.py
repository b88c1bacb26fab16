"""Many adapters on one base model, mixed in one batch, for `mlxft serve`.

Each adapted linear layer of the base becomes a MultiAdapterLinear holding a stack of every loaded
adapter's low-rank matrices, slot 0 being "no adapter" (zeros):

    A [slots, in, r]   B [slots, r, out]   scale [slots]   gain [slots, out] (DoRA only)

and before each forward pass the serving loop says which slot each row of the batch uses
(AdapterRows). A row's output is its base output plus its own adapter's branch,
scale * (x A) B, so a batch can hold requests for different adapters and for the base, and no
weight is ever merged or reloaded. Ranks differ between adapters: the stack is as wide as the
largest and the others are padded with zeros, which add nothing. An adapter that does not adapt
a layer has zeros there too, so adapters of different target modules and layers mix.

DoRA rows work the same way: for a fixed base and adapter, DoRA's rescaling of each output row,
m / ||W + scale B A||, is a constant vector (the gain), computed once when the adapter is added;
the row's output is then base + (gain - 1) * W x + gain * scale * (x A) B, PEFT's arithmetic
(see lora.AdapterDoRALinear), with gain 1 for plain LoRA rows and for the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from mlxft.errors import UserError
from mlxft.models.adapters import AdapterSpec, check_modules


class AdapterRows:
    """The adapter slot of each row of the next forward pass, shared by every MultiAdapterLinear
    of a model; None when no row uses an adapter (the layers are then their base layers)."""

    def __init__(self):
        self.slots: mx.array | None = None

    def set(self, slots: list[int]) -> None:
        self.slots = mx.array(slots, dtype=mx.int32) if any(slots) else None


class MultiAdapterLinear(nn.Module):
    def __init__(self, linear, rows: AdapterRows):
        super().__init__()
        self.linear = linear
        self.rows = rows
        self.a = self.b = self.scale = self.gain = None

    def set_stack(self, a, b, scale, gain) -> None:
        self.a, self.b, self.scale, self.gain = a, b, scale, gain

    def __call__(self, x):
        y = self.linear(x)
        slots = self.rows.slots
        if slots is None or self.a is None:
            return y
        update = (x @ self.a[slots]) @ self.b[slots]  # [B, T, in] @ [B, in, r] @ [B, r, out]
        scale = self.scale[slots][:, None, None]
        if self.gain is None:
            return y + (scale * update).astype(x.dtype)
        gain = self.gain[slots][:, None, :].astype(x.dtype)
        plain = y - self.linear.bias if "bias" in self.linear else y
        return y + (gain - 1) * plain + (gain * update * scale).astype(x.dtype)


@dataclass
class LoadedAdapter:
    name: str
    scale: float
    weights: dict  # {module path: (A [r, in], B [out, r]) or (A, B, m)}, PEFT's orientation
    gains: dict  # {module path: m / ||W + scale B A|| per output row}, DoRA only

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, *_ in self.weights.values())


class AdapterStack:
    """The adapters served on one model, by name, each in a slot of every MultiAdapterLinear."""

    def __init__(self, model):
        from mlxft.backends.mlx.lora import dims, linear_modules

        self.model = model
        self.slots: list[LoadedAdapter | None] = [None]  # slot 0: the base, no adapter
        self.retiring: set[int] = set()  # removed, but rows in flight still use them
        # Layers wrapped by an earlier server on the same model are taken over, emptied, with their
        # AdapterRows: whichever engine runs the model says which rows use which slot.
        self.layers = {path: m for path, m in model.named_modules() if isinstance(m, MultiAdapterLinear)}
        self.rows = next(iter(self.layers.values())).rows if self.layers else AdapterRows()
        for layer in self.layers.values():
            layer.rows = self.rows
            layer.set_stack(None, None, None, None)
        # {path: (out, in)} of the base's linear layers
        self.modules = {path: shape for path, shape in linear_modules(model).items() if path.rsplit(".", 1)[0] not in self.layers}
        self.modules.update({path: dims(layer.linear) for path, layer in self.layers.items()})

    @property
    def names(self) -> list[str]:
        return [a.name for i, a in enumerate(self.slots) if a is not None and i not in self.retiring]

    def slot(self, name: str) -> int | None:
        for i, loaded in enumerate(self.slots):
            if loaded is not None and loaded.name == name and i not in self.retiring:
                return i
        return None

    def add(self, name: str, spec: AdapterSpec, weights: dict, where: str) -> int:
        if self.slot(name) is not None:
            raise UserError(f"an adapter named '{name}' is already served")
        if spec.task_type != "CAUSAL_LM":
            raise UserError(f"adapter {where}: a {spec.task_type} adapter, not a CAUSAL_LM one; it cannot answer requests")
        check_modules(weights, self.modules, where)
        self.wrap([path for path in weights if path not in self.layers])
        gains = {path: self.dora_gain(path, spec.scaling, tensors) for path, tensors in weights.items() if len(tensors) == 3}
        loaded = LoadedAdapter(name, spec.scaling, weights, gains)
        free = [i for i, a in enumerate(self.slots) if i and a is None]
        slot = free[0] if free else len(self.slots)
        if slot == len(self.slots):
            self.slots.append(loaded)
        else:
            self.slots[slot] = loaded
        self.rebuild()
        return slot

    def remove(self, name: str) -> None:
        """Stop serving `name`; its slot is emptied once no row uses it (release)."""
        slot = self.slot(name)
        if slot is None:
            raise UserError(f"no adapter named '{name}' is served")
        self.retiring.add(slot)

    def release(self, in_use: set[int]) -> None:
        """Empty the slots of removed adapters that no row uses any more."""
        done = self.retiring - in_use
        if done:
            for slot in done:
                self.slots[slot] = None
            self.retiring -= done
            self.rebuild()

    def wrap(self, paths: list[str]) -> None:
        modules = dict(self.model.named_modules())
        wrapped = [(path, MultiAdapterLinear(modules[path], self.rows)) for path in paths]
        if wrapped:
            self.model.update_modules(tree_unflatten(wrapped))
            self.layers.update(wrapped)

    def dora_gain(self, path: str, scale: float, tensors) -> np.ndarray:
        a, b, magnitude = tensors
        weight = base_weight(self.layers[path].linear).astype(mx.float32)
        adapted = weight + scale * (mx.array(b) @ mx.array(a))
        return np.array(mx.array(magnitude) / mx.linalg.norm(adapted, axis=1))

    def rebuild(self) -> None:
        """Write every layer's stack from the adapters in their slots (zeros where a slot is empty
        or its adapter does not adapt the layer)."""
        loaded = [(i, a) for i, a in enumerate(self.slots) if a is not None]
        rank = max((a.rank for _, a in loaded), default=0)
        n = len(self.slots)
        for path, layer in self.layers.items():
            out_dim, in_dim = self.modules[path]
            users = [(i, a) for i, a in loaded if path in a.weights]
            if not users:
                layer.set_stack(None, None, None, None)
                continue
            a_stack = np.zeros((n, in_dim, rank), np.float32)
            b_stack = np.zeros((n, rank, out_dim), np.float32)
            scale = np.zeros(n, np.float32)
            gain = np.ones((n, out_dim), np.float32) if any(path in a.gains for _, a in users) else None
            for i, adapter in users:
                a, b, *_ = adapter.weights[path]
                a_stack[i, :, : a.shape[0]] = a.T
                b_stack[i, : b.shape[1], :] = b.T
                scale[i] = adapter.scale
                if gain is not None and path in adapter.gains:
                    gain[i] = adapter.gains[path]
            layer.set_stack(mx.array(a_stack), mx.array(b_stack), mx.array(scale), None if gain is None else mx.array(gain))
        mx.eval([[layer.a, layer.b, layer.scale, layer.gain] for layer in self.layers.values() if layer.a is not None])


def base_weight(linear) -> mx.array:
    """A linear layer's weight [out, in], de-quantized when the layer is quantized."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits)
    return linear.weight
