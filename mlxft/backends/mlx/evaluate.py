"""Validation on MLX: token-weighted answer loss and, for Yes/No data, AUC as TALLRec scores it.

AUC reads the logits of the two answer tokens ("▁Yes", "▁No": derived from the tokenizer, never
hard-coded) at the first answer position and takes P(yes) = softmax over those two, as
TALLRec's evaluation does. Padding rows and positions carry no weight.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxft.backends.mlx import PAD_MULTIPLE
from mlxft.backends.mlx.model import logits_at
from mlxft.data.batching import iterate_batches, scored_targets
from mlxft.eval.metrics import ValidationTally
from mlxft.train.distributed import World


def evaluate(model, examples, *, pad_id: int, split_head: bool, batch_size: int = 32,
             answer_ids: list[int] | None = None, world: World = World()) -> dict:
    """{'loss', 'tokens'} and, when every row's answer starts with one of answer_ids,
    {'auc', 'accuracy', 'positive_rate', 'probabilities'}."""
    was_training = model.training
    model.eval()
    rows = world.share(len(examples))  # each rank its share; result() adds them up
    tally = ValidationTally(answer_ids, rows, len(examples))
    examples = [examples[i] for i in rows]
    for batch in iterate_batches(examples, batch_size, pad_id, shuffle=False, pad_to_multiple=PAD_MULTIPLE):
        targets = scored_targets(batch)
        logits = logits_at(model, mx.array(batch.input_ids[:, :-1]), mx.array(targets.positions), split_head)
        logits = logits.astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, mx.array(targets.tokens)) * mx.array(targets.weights)
        yes = None
        if answer_ids is not None:  # the first answer position: targets are in order
            yes = np.array(mx.softmax(logits[:, 0, :][:, answer_ids], axis=-1)[:, 0])
        tally.add(losses.sum().item(), targets, yes)
    if was_training:
        model.train()
    return tally.result(world)
