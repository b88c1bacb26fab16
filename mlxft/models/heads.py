"""The heads trained beside an adapter: a reward model's scalar head and PPO's value head.

A reward model is the base model + a LoRA adapter + a scalar head (`score`, a [1, hidden] linear
layer without bias, trained in full), read at the last token of prompt + answer that is not
padding: the token transformers' AutoModelForSequenceClassification reads, so that the saved
adapter (PEFT's SEQ_CLS layout, the head in modules_to_save) scores the same there. Heads start
from numbers drawn in numpy, so that both backends begin from the same weights.
"""

from __future__ import annotations

import numpy as np

from mlxft.errors import UserError

HEAD = "score"  # transformers' name for the head of *ForSequenceClassification


TASK_TYPE = "SEQ_CLS"


HEAD_INIT_STD = 0.02  # transformers' initializer_range for the head of a classification model


def init_head(hidden_size: int, seed: int) -> np.ndarray:
    """A new head [1, hidden] (normal, std 0.02, as transformers initialises one), drawn in numpy
    so that both backends start from the same numbers."""
    return (np.random.default_rng(seed).standard_normal((1, hidden_size)) * HEAD_INIT_STD).astype(np.float32)


def score_positions(input_ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Per row [N], the index of its last token that is not padding, found as transformers finds
    it (the rightmost id other than pad_token_id): when the pad token is also the end-of-sequence
    token, an answer's closing EOS is padding to transformers, and so it is here."""
    real = input_ids != pad_id
    if not real.any(axis=1).all():
        raise UserError("a row to score is all padding tokens; is the tokenizer's pad token its only token?")
    return (input_ids.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)).astype(np.int32)


def saved_head(adapter, hidden_size: int, *, required: bool = True) -> np.ndarray | None:
    """The head [1, hidden] saved beside an adapter (modules_to_save); without one, a UserError,
    or None when not `required` (an SFT adapter a reward run starts from)."""
    from mlxft.models.adapters import load_saved_modules

    saved = load_saved_modules(adapter).get(f"{HEAD}.weight")
    if saved is None:
        if required:
            raise UserError(f"adapter {adapter}: no reward head ({HEAD}.weight) saved beside it")
        return None
    if saved.shape != (1, hidden_size):
        raise UserError(f"adapter {adapter}: its reward head is {list(saved.shape)}, this model needs [1, {hidden_size}]")
    return saved.astype(np.float32)


def start_head(hidden_size: int, start_from, seed: int) -> np.ndarray:
    """The head a run starts from: the one saved beside the adapter it continues (a reward adapter,
    or a resumed run's checkpoint), else a new one."""
    saved = saved_head(start_from, hidden_size, required=False) if start_from else None
    return init_head(hidden_size, seed) if saved is None else saved


def reward_spec(spec):
    """An adapter spec as a reward model saves it: SEQ_CLS, the head in modules_to_save."""
    from dataclasses import replace

    return replace(spec, task_type=TASK_TYPE, modules_to_save=[HEAD])


def value_head_init(hidden_size: int, seed: int) -> np.ndarray:
    """PPO's value head [1, hidden] at the start (its bias starts at 0): as a reward head starts,
    drawn in numpy so that both backends begin from the same numbers."""
    from mlxft.models.heads import init_head

    return init_head(hidden_size, seed + 1)
