"""A pair batch with each prompt run once: chosen and rejected answers share their prompt.

A pair batch (mlxft.data.batching.PairBatch) has 2B rows: B prompt + chosen, then B prompt +
rejected. On the bundled preference sample 59% of a row's tokens are prompt, so running every
prompt twice spends ~30% of each DPO forward (policy and reference) on work already done. Here
each pair becomes one row of W = P + 2A positions, [prompt | chosen | rejected]:

- the prompt, left-padded to P, so it ends at position P - 1, whose output predicts the first
  token of both answers;
- the chosen answer at positions P .. P + A - 1, right-padded to A;
- the rejected answer at the same positions P .. P + A - 1 (`positions` restarts there), kept
  from seeing the chosen one by the mask.

One row per pair keeps the matrix products as tall as before (a forward of B x W tokens, where
two passes, prompts then answers, would run two shorter products: on a CPU with small batches
those run at half the rate). Position embeddings are rotary, so attention sees distances only:
each scored token gets the log-prob of its unshared row (up to float rounding), and so do the
gradients. The loss is the same, computed over B x (P + 2A) positions instead of 2B x (P + A).

The prompt of a pair is the common prefix of its two rows, up to the first scored token of
either, so what is scored does not change even when a cut left a pair without a prompt.

With LoRA dropout, both answers see their prompt through one dropout mask where the two rows
drew two: the same loss in expectation, with less noise in the margin between the answers.

`mask [B, 1, W, W]` is boolean, True where a query may attend: causal over the real prompt
tokens (a padding position sees itself, so no softmax row is empty), and each answer sees the
real prompt tokens and its own earlier tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlxft.data.batching import Batch, scored_targets


@dataclass
class SharedPrompts:
    prompt_ids: np.ndarray  # [B, P] int32, left-padded
    answer_ids: np.ndarray  # [2B, A] int32, right-padded; chosen rows, then rejected
    mask: np.ndarray  # [B, 1, P + 2A, P + 2A] bool
    positions: np.ndarray  # [P + 2A] int32: 0 .. P + A - 1, then P .. P + A - 1 again
    # [2B, A] float32: 1 where answer_ids[r, k] is scored. It is predicted by the prompt's last
    # output for k = 0 and by the answer's output k - 1 after that.
    weights: np.ndarray
    prompt_lengths: np.ndarray  # [B] int32
    answer_lengths: np.ndarray  # [2B] int32

    @property
    def computed_tokens(self) -> int:
        """Non-padding positions the model runs: each prompt once, each answer once."""
        return int(self.prompt_lengths.sum() + self.answer_lengths.sum())

    @property
    def computed_positions(self) -> int:
        """All positions the model runs, padding included."""
        return int(self.mask.shape[0] * self.mask.shape[-1])


def share_prompts(batch: Batch, pad_id: int, pad_to_multiple: int = 1, *, few_widths: bool = False) -> SharedPrompts:
    """The 2B rows of a pair batch (chosen rows first) as one prompt per pair plus 2B answers;
    both widths rounded up to `pad_to_multiple` (and at least 1), and with `few_widths` past 64
    to an eighth of their power of two (see padded_width)."""
    rows, lengths = batch.input_ids, batch.lengths
    if len(rows) % 2:
        raise ValueError(f"a pair batch has an even number of rows (chosen, then rejected), not {len(rows)}")
    b = len(rows) // 2
    scored = batch.loss_mask.astype(bool)
    first_scored = np.where(scored.any(axis=1), scored.argmax(axis=1), lengths)
    common = np.cumprod(rows[:b] == rows[b:], axis=1).sum(axis=1)
    prompt_lengths = np.minimum(common, np.minimum(first_scored[:b], first_scored[b:])).astype(np.int32)
    answer_lengths = (lengths - np.tile(prompt_lengths, 2)).astype(np.int32)

    p = padded_width(int(prompt_lengths.max()), pad_to_multiple, few_widths)
    a = padded_width(int(answer_lengths.max()), pad_to_multiple, few_widths)
    prompt_ids = np.full((b, p), pad_id, dtype=np.int32)
    answer_ids = np.full((2 * b, a), pad_id, dtype=np.int32)
    weights = np.zeros((2 * b, a), dtype=np.float32)
    for row in range(b):
        n = prompt_lengths[row]
        prompt_ids[row, p - n:] = rows[row, :n]
    for row in range(2 * b):
        start, n = prompt_lengths[row % b], answer_lengths[row]
        answer_ids[row, :n] = rows[row, start:start + n]
        weights[row, :n] = scored[row, start:start + n]

    real_prompt = np.arange(p)[None, :] >= (p - prompt_lengths)[:, None]  # [B, P]
    causal_a = np.tril(np.ones((a, a), dtype=bool))
    mask = np.zeros((b, p + 2 * a, p + 2 * a), dtype=bool)
    mask[:, :p, :p] = np.tril(np.ones((p, p), dtype=bool)) & (real_prompt[:, None, :] | np.eye(p, dtype=bool))
    for start in (p, p + a):  # the chosen answer's rows, then the rejected one's
        mask[:, start:start + a, :p] = real_prompt[:, None, :]
        mask[:, start:start + a, start:start + a] = causal_a
    positions = np.concatenate([np.arange(p + a), np.arange(p, p + a)]).astype(np.int32)
    return SharedPrompts(prompt_ids, answer_ids, mask[:, None], positions, weights, prompt_lengths, answer_lengths)


def padded_width(n: int, multiple: int, few_widths: bool = False) -> int:
    """n (at least 1) rounded up to `multiple`; with `few_widths`, to an eighth of n's power of
    two when that is coarser: 64-127 to 8, 128-255 to 16, ... Each (prompt, answer) width pair is
    a trace of MLX's compiled step, and with two widths a fine multiple would make hundreds on
    long, varied pairs; this keeps them to ~8 per octave of each, at most ~12% padding."""
    n = max(1, n)
    if few_widths:
        multiple = max(multiple, 2 ** (n.bit_length() - 4))
    return -(-n // multiple) * multiple


def pair_inputs(batch: Batch, pad_id: int, *, shared: bool, pad_to_multiple: int, few_widths: bool = False) -> dict[str, np.ndarray]:
    """What a backend's DPO step takes for a pair batch, as numpy arrays by name; either layout
    runs the LM head on answer tokens only.
    - shared prompts: prompt_ids [B, P], answer_ids [2B, A] (also the targets), mask and weights [2B, A];
    - the 2B rows as they are: inputs [2B, T - 1], positions, tokens and weights [2B, K]
      (mlxft.data.batching.scored_targets)."""
    if shared:
        layout = share_prompts(batch, pad_id, pad_to_multiple, few_widths=few_widths)
        return {"prompt_ids": layout.prompt_ids, "answer_ids": layout.answer_ids, "mask": layout.mask,
                "weights": layout.weights}
    targets = scored_targets(batch)
    return {"inputs": batch.input_ids[:, :-1], "positions": targets.positions, "tokens": targets.tokens,
            "weights": targets.weights}
