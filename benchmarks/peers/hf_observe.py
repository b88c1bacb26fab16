"""Observers for a transformers Trainer (plain or TRL), shared by the PyTorch peer scripts:
each step's wall time, the tokens of its training forward, its loss, and the process's peak RSS
over the timed steps. They only read; the trainer runs as it would without them."""

from __future__ import annotations

import time
from pathlib import Path


def count_training_forwards(model, forwards: list) -> None:
    """Per forward pass with gradients on (the policy's, not a reference's under no_grad): its
    non-padding tokens (attention_mask), padded tokens and scored labels."""
    import torch

    def count(_module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        forwards.append({"tokens": int(mask.sum()) if mask is not None else int(ids.numel()),
                         "padded_tokens": int(ids.numel()),
                         "supervised_tokens": int((labels[:, 1:] != -100).sum()) if labels is not None else None})

    model.register_forward_pre_hook(count, with_kwargs=True)


def step_timer(forwards: list, steps: list, warmup: int):
    """A TrainerCallback: a step's time runs from the previous step's end (the first: from the
    start of training) to its own, data loading included, as a training loop's wall time does."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.last, self.last_cpu, self.seen = time.perf_counter(), time.process_time(), 0

        def on_step_end(self, args, state, control, **kw):
            now, cpu = time.perf_counter(), time.process_time()
            new = forwards[self.seen:]
            self.seen = len(forwards)
            steps.append({"step": state.global_step, "seconds": now - self.last, "cpu_seconds": cpu - self.last_cpu,
                          "timed": state.global_step > warmup, "tokens": sum(f["tokens"] for f in new),
                          "padded_tokens": sum(f["padded_tokens"] for f in new),
                          "supervised_tokens": sum(f["supervised_tokens"] or 0 for f in new), "forwards": len(new)})
            self.last, self.last_cpu = now, cpu
            if state.global_step == warmup:
                reset_peak_rss()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    return Timer()


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return None
