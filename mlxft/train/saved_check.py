"""Saved equals trained: after a run writes its adapter, the file is loaded back into the model
and a probe batch is run three ways. The logits with the saved adapter must equal the trained
model's (the file holds what was trained), and must differ from the base model's (the adapter is
not a silent no-op, as peers have shipped). Backend-neutral: `lora` is a backend's lora module
(adapter_weights, set_adapter_weights, adapter_off, probe_logits), `model` its adapted model.
The figures go into summary.json as `saved_check`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.models.adapters import load_adapter

SAVED_TOLERANCE = 1e-5  # relative to the largest logit; float32 adapters reload exactly (measured 0)
NO_OP = 1e-7  # an adapter whose effect is below this, relative to the largest logit, changes nothing


# The probe of fuse and export, which have no data to take one from: token ids any vocabulary of
# 2,048 or more holds (smaller ones take them modulo their size).
FIXED_PROBE = [1, 17, 230, 41, 990, 12, 7, 1500, 33, 600, 8, 20, 5, 77, 120, 43]


def fixed_probe(vocab_size: int) -> list[list[int]]:
    return [[i % vocab_size for i in FIXED_PROBE]]


def relative_difference(got: np.ndarray, reference: np.ndarray) -> float:
    """The largest |got - reference| over the largest |reference|: how far logits moved, whatever their scale."""
    return float(np.abs(got - reference).max()) / (float(np.abs(reference).max()) or 1.0)


def probe_ids(examples, length: int = 64) -> list[list[int]]:
    """The first example's tokens (at most `length`; a preference pair's prompt and chosen answer):
    the same probe on every backend."""
    first = examples[0]
    tokens = first.input_ids if hasattr(first, "input_ids") else [*first.prompt_ids, *first.chosen_ids]
    return [list(tokens[:length])]


def check_saved_adapter(lora, model, saved: str | Path, ids: list[list[int]], echo=print) -> dict:
    trained = lora.probe_logits(model, ids)
    current = lora.adapter_weights(model)
    lora.set_adapter_weights(model, load_adapter(saved, task_type=None)[1])
    try:
        reloaded = lora.probe_logits(model, ids)
    finally:
        lora.set_adapter_weights(model, current)
    with lora.adapter_off(model):
        base = lora.probe_logits(model, ids)
    check = {"probe_tokens": len(ids[0]),
             "saved_vs_trained": relative_difference(reloaded, trained),
             "adapter_effect": relative_difference(base, trained)}
    if not check["saved_vs_trained"] <= SAVED_TOLERANCE:
        raise UserError(f"the adapter saved in {saved} does not reproduce the trained model: its logits differ by "
                        f"{check['saved_vs_trained']:.2e} of the largest (allowed {SAVED_TOLERANCE:g})")
    check["adapter_changes_logits"] = check["adapter_effect"] > NO_OP
    if not check["adapter_changes_logits"]:
        echo(f"warning: the adapter in {saved} does not change the model's logits (effect {check['adapter_effect']:.1e}): "
             "it is a no-op (learning rate 0, or no step taken?)")
    return check
