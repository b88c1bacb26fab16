"""AdamW as mlx.optimizers.AdamW computes it, so both backends take the same steps.

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g²
    w = w (1 - lr wd) - lr m̂ / (sqrt(v̂) + eps)

with the decay applied to every trainable tensor, as MLX does. With bias_correction (the
trainers' default, `train.bias_correction`), m̂ = m / (1 - b1^t) and v̂ = v / (1 - b2^t): the
textbook update, and torch.optim.AdamW's. Without it (MLX's and mlx-lm's default) m̂ = m and
v̂ = v, and the first step moves each weight by lr * 0.1 / sqrt(0.001) ≈ 3.16 lr instead of lr.
torch.optim.AdamW cannot switch the correction off, hence this class.
"""

from __future__ import annotations

import torch


class MLXAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 bias_correction: bool = False):
        """`params`: the tensors, or {name: tensor}, whose names checkpoints and the first steps'
        probes then use (`named`)."""
        self.named = dict(params) if isinstance(params, dict) else None
        super().__init__(list(params.values()) if isinstance(params, dict) else params,
                         {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                          "bias_correction": bias_correction})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v, g = state["m"], state["v"], p.grad
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(1 - lr * wd)
                if group["bias_correction"]:
                    t = state["step"]
                    denominator = (v.sqrt() / (1 - b2**t) ** 0.5).add_(eps)
                    p.addcdiv_(m, denominator, value=-lr / (1 - b1**t))
                else:
                    p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)
