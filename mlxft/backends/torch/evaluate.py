"""Validation on PyTorch: token-weighted answer loss and, for Yes/No data, AUC as TALLRec scores it.

The same computation as mlxft.backends.mlx.evaluate: the logits of the two answer tokens
("▁Yes", "▁No": derived from the tokenizer, never hard-coded) at the first answer position, and
P(yes) = softmax over those two. Padding rows and positions carry no weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlxft.backends.torch import PAD_MULTIPLE
from mlxft.backends.torch.model import autocast, logits_at, to_device
from mlxft.data.batching import iterate_batches, scored_targets
from mlxft.eval.metrics import ValidationTally
from mlxft.train.distributed import World


@torch.no_grad()
def evaluate(model, examples, *, pad_id: int, split_head: bool, batch_size: int = 32,
             answer_ids: list[int] | None = None, world: World = World()) -> dict:
    """{'loss', 'tokens'} and, when every row's answer starts with one of answer_ids,
    {'auc', 'accuracy', 'positive_rate', 'probabilities'}."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = world.share(len(examples))  # each rank its share; result() adds them up
    tally = ValidationTally(answer_ids, rows, len(examples))
    examples = [examples[i] for i in rows]
    for batch in iterate_batches(examples, batch_size, pad_id, shuffle=False, pad_to_multiple=PAD_MULTIPLE):
        targets = scored_targets(batch)
        inputs, positions, tokens, weights = to_device(device, batch.input_ids[:, :-1], targets.positions,
                                                       targets.tokens, targets.weights)
        with autocast(device):
            logits = logits_at(model, inputs, positions, split_head)
        logits = logits.float()
        losses = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none") * weights.flatten()
        yes = None
        if answer_ids is not None:  # the first answer position: targets are in order
            yes = torch.softmax(logits[:, 0, :][:, answer_ids], dim=-1)[:, 0].cpu().numpy()
        tally.add(losses.sum().item(), targets, yes)
    if was_training:
        model.train()
    return tally.result(world)
