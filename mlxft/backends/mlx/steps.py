"""The steps of the MLX trainers: one optimizer step for any objective, and each method's loss.
The trainers (sft.py, dpo.py) and the bench run exactly these.

An objective is a function loss(model, *inputs) -> (loss sum, sums): the loss summed over its
micro-batch, and a vector of the method's statistic sums whose [0] is what the loss is a sum over
(scored tokens, pairs) and [1] the loss sum (see mlxft.train.driver). Gradients of the sums add up over
micro-batches and are divided once by the step's sums[0], so k micro-batches give exactly the
gradient of one batch k times the size.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxft.backends.mlx import PAD_MULTIPLE, SHARED_PROMPT_FEW_WIDTHS, SHARED_PROMPT_PAD_MULTIPLE, lora
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx.model import hidden_scores, scores_at, shared_prompt_hidden
from mlxft.data.batching import iterate_pair_batches, scored_targets
from mlxft.data.packing import block_mask
from mlxft.data.shared_prompt import pair_inputs
from mlxft.losses.dpo import pair_objective
from mlxft.losses.reward import reward_objective
from mlxft.losses.rl import policy_objective
from mlxft.models.heads import score_positions
from mlxft.train.distributed import World, empty, step_seed
from mlxft.train.driver import StepResult
from mlxft.train.first_step import TensorProbe, sample_points

# --- one optimizer step ----------------------------------------------------------------------------


def make_step(model, optimizer, loss, max_grad_norm: float | None):
    """The compiled pieces of an optimizer step, with the state they read and write named:
    micro_step(*inputs) -> (gradient sums, statistic sums)
    update(gradient sums, count) -> gradient norm (before clipping); applies AdamW."""
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(*inputs):
        (_, sums), grads = loss_and_grad(model, *inputs)
        return grads, sums

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads, count):
        # The step's loss sum / what it sums over: one big batch, whatever k is.
        grads = tree_map(lambda g: g / count, grads)
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm or float("inf"))
        optimizer.update(model, grads)
        return norm

    return micro_step, update


def train_step(model, optimizer, micro_step, update, inputs_of, seed: int, world: World = World(), statistics: int = 2,
               updates: int = 1, passes_of=None):
    """The driver's step(step index, micro-batches, learning rate) -> StepResult; `inputs_of(batch)`
    lays a micro-batch out as micro_step takes it, or `passes_of(batch)` as a list of such inputs,
    one forward and backward each (online RL's rl.completions_per_pass). With several ranks each
    takes its share of every micro-batch, and the gradient and statistic sums (`statistics` of
    them) are added across ranks before the update divides by the global count. With `updates` > 1
    (online RL's rl.num_iterations) the micro-batches are laid out once and trained on that many
    times, one optimizer update each; the statistics sum over all of them."""
    state = [model.state, optimizer.state, mx.random.state]
    passes_of = passes_of or (lambda batch: [inputs_of(batch)])

    def step(index: int, batches: list, rate: float, probe: bool = False) -> StepResult:
        mx.random.seed(step_seed(seed, index, world.rank))  # resume-exact dropout noise
        mine = [batch for batch in map(world.shard, batches) if not empty(batch)]  # a rank may get no rows
        laid_out = [passes_of(batch) for batch in mine] if updates > 1 else None
        optimizer.learning_rate = rate
        total, probes = None, None
        for _ in range(updates):
            grads, sums = None, None
            for passes in laid_out or map(passes_of, mine):  # one at a time, when each is used once
                for inputs in passes:
                    micro_grads, micro_sums = micro_step(*inputs)
                    grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
                    sums = micro_sums if sums is None else sums + micro_sums
                    # Now, not lazily at the update: else every pass's activations are alive at once,
                    # and gradient accumulation or rl.completions_per_pass would save no memory.
                    mx.eval(grads, sums)
            if world.size > 1:
                grads = grads if grads is not None else tree_map(mx.zeros_like, model.trainable_parameters())
                sums = sums if sums is not None else mx.zeros((statistics,), mx.float32)
                grads, sums = all_sum(grads, sums, world)
            before = probe_before(model, grads) if probe and probes is None else None
            grad_norm = update(grads, sums[0])
            mx.eval(state, sums, grad_norm)
            if before is not None:
                probes = probe_after(model, *before)
            total = sums if total is None else total + sums
        mlx_model.trim_cache()
        return StepResult(np.array(total), grad_norm.item(), float(optimizer.learning_rate.item()), probes)

    return step


def probe_before(model, grads) -> tuple:
    """What a probe reads before the update (mlxft.train.first_step): per trainable tensor its largest
    |gradient|, whether the gradient is finite, and the weights at the sampled points and at the
    largest gradient's."""
    grads, weights = dict(tree_flatten(grads)), dict(tree_flatten(model.trainable_parameters()))
    names = [name for name in weights if name in grads]
    points, read = {}, []
    for name in names:
        g = mx.abs(grads[name].reshape(-1).astype(mx.float32))
        points[name] = mx.concatenate([mx.argmax(g)[None].astype(mx.int32),
                                       mx.array(list(sample_points(g.size)), mx.int32)])
        read.append(mx.stack([g.max(), mx.all(mx.isfinite(g)).astype(mx.float32)]))
    values = {name: weights[name].reshape(-1)[points[name]] for name in names}
    mx.eval(points, values, read)
    return names, points, values, [r.tolist() for r in read]


def probe_after(model, names, points, before, read) -> list[TensorProbe]:
    """TensorProbes from probe_before's readings and the weights after the update."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    moved = [mx.any(weights[name].reshape(-1)[points[name]] != before[name]) for name in names]
    mx.eval(moved)
    return [TensorProbe(name, gradient, bool(finite), bool(m.item()))
            for name, (gradient, finite), m in zip(names, read, moved)]


def all_sum(grads, sums, world: World):
    """Gradient and statistic sums added across the ranks, in one all-reduce of one flat buffer."""
    leaves = tree_flatten(grads)
    flat = mx.concatenate([g.reshape(-1) for _, g in leaves] + [sums.astype(mx.float32)])
    flat = mx.distributed.all_sum(flat, group=world.group)
    out, offset = [], 0
    for name, g in leaves:
        out.append((name, flat[offset : offset + g.size].reshape(g.shape).astype(g.dtype)))
        offset += g.size
    return tree_unflatten(out), flat[offset:]


# --- supervised fine-tuning ----------------------------------------------------------------------


def sft_loss(model, inputs, positions, tokens, weights, *, split_head: bool, chunk: int | None = None):
    """(cross-entropy sum over the scored tokens, [scored tokens, that sum]); the LM head on
    `chunk` scored positions at a time (train.head_chunk; mlxft.backends.mlx.model.token_scores)."""
    loss_sum, n_tokens = mlx_model.token_losses(model, inputs, positions, tokens, weights, split_head, chunk)
    return loss_sum, mx.stack([n_tokens, mx.stop_gradient(loss_sum)])


def sft_inputs(batch) -> tuple:
    """A micro-batch as sft_loss takes it: the inputs, and the positions, tokens and weights scored."""
    targets = scored_targets(batch)
    return (mx.array(batch.input_ids[:, :-1]), mx.array(targets.positions), mx.array(targets.tokens),
            mx.array(targets.weights))


def packed_sft_loss(model, inputs, mask, positions, tokens, weights, *, chunk: int | None = None):
    """sft_loss of packed rows (mlxft.data.packing): each example attends only to itself."""
    hidden = mlx_model.block_masked_hidden_at(model, inputs, mask, positions)
    losses = -hidden_scores(model, hidden, tokens, chunk) * weights
    return losses.sum(), mx.stack([weights.sum(), mx.stop_gradient(losses.sum())])


def packed_sft_inputs(batch) -> tuple:
    """A micro-batch of packed rows as packed_sft_loss takes it: sft_inputs with the block mask."""
    inputs, positions, tokens, weights = sft_inputs(batch)
    return inputs, mx.array(block_mask(batch.segment_ids[:, :-1])), positions, tokens, weights


# --- online RL -------------------------------------------------------------------------------------


def token_logps(model, inputs, positions, tokens, split_head: bool, chunk: int | None = None, grad: bool = True):
    """(log-probs [N, K] of the scored tokens, their entropies [N, K], without gradient)."""
    logps, _, entropy = scores_at(model, inputs, positions, tokens, split_head, chunk, grad=grad, extras=True)
    return logps, entropy


def token_logps_values(model, inputs, positions, tokens, chunk: int | None = None, grad: bool = True):
    """(log-probs [N, K], entropies [N, K], PPO's values [N, K]): the LM head and the value head
    (float32) on the same hidden states, from one forward."""
    hidden = mlx_model.hidden_at(model, inputs, positions)
    logps, _, entropy = hidden_scores(model, hidden, tokens, chunk, grad=grad, extras=True)
    return logps, entropy, model.value_head(hidden.astype(mx.float32))[..., 0]


def rl_loss(model, inputs, positions, tokens, weights, reference, old_logps, old_values, advantages, returns, carried, *,
            split_head: bool, rc, chunk: int | None = None):
    """(the policy loss sum of a rollout's completions, mlxft.losses.rl statistic sums): the loss
    statistics, the completion tokens' entropy, then the rollout's reward sums (`carried`).
    `old_logps` count from a second update on a rollout (rl.num_iterations), `old_values` and
    `returns` for PPO only; they are zeros otherwise."""
    values = None
    if rc.algo == "ppo":
        logps, entropy, values = token_logps_values(model, inputs, positions, tokens, chunk)
    else:
        logps, entropy = token_logps(model, inputs, positions, tokens, split_head, chunk)
    loss_sum, sums = policy_objective(logps, reference, weights, advantages, rc, xp=mx, detach=mx.stop_gradient,
                                      old_logps=old_logps if rc.num_iterations > 1 else None, values=values,
                                      old_values=old_values, returns=returns)
    return loss_sum, mx.concatenate([sums, mx.stop_gradient((entropy * weights).sum())[None], carried])


def make_old_policy_step(model, split_head: bool, ppo: bool, chunk: int | None = None):
    """Compiled: the policy's log-probs [N, K] of a rollout's completion tokens as it was when it
    sampled them (π_old of a later update), and for PPO its values [N, K] (else zeros)."""

    @partial(mx.compile, inputs=[model.state])
    def old_policy_step(inputs, positions, tokens):
        if ppo:
            logps, _, values = token_logps_values(model, inputs, positions, tokens, chunk, grad=False)
        else:
            logps = scores_at(model, inputs, positions, tokens, split_head, chunk, grad=False)  # no entropy needed
            values = mx.zeros(logps.shape)
        return mx.stop_gradient(logps), mx.stop_gradient(values)

    return old_policy_step


def make_token_reference_step(model, split_head: bool, chunk: int | None = None):
    """Compiled: the reference's log-probs [N, K] of a rollout's completion tokens, from the base
    model (adapter off; see make_reference_step)."""

    @partial(mx.compile, inputs=[model.state])
    def reference_step(inputs, positions, tokens):
        with lora.adapter_off(model):
            logps = scores_at(model, inputs, positions, tokens, split_head, chunk, grad=False)  # no entropy needed
        return mx.stop_gradient(logps)

    return reference_step


# --- reward models ---------------------------------------------------------------------------------


def reward_scores(model, input_ids, positions, head=None):
    """Scores [N] of whole rows: the reward head (`head`, else `model.score`; float32) on the
    hidden state at each row's position (mlxft.models.heads.score_positions)."""
    hidden = mx.take_along_axis(model.model(input_ids), positions[:, None, None], axis=1)[:, 0]
    return (head or model.score)(hidden.astype(mx.float32))[:, 0]


def reward_loss(model, input_ids, positions, *, center_coefficient: float):
    """(sum of the Bradley-Terry losses of a pair batch, mlxft.losses.reward.STATISTICS sums)."""
    return reward_objective(reward_scores(model, input_ids, positions), center_coefficient, xp=mx, detach=mx.stop_gradient)


def reward_inputs(pairs, pad_id: int) -> tuple:
    """A pair batch as reward_loss takes it: its 2B rows (chosen, then rejected) and where each is scored."""
    ids = pairs.batch.input_ids
    return mx.array(ids), mx.array(score_positions(ids, pad_id))


# --- DPO -----------------------------------------------------------------------------------------


def sequence_logps(model, arrays: dict, split_head: bool, chunk: int | None = None, grad: bool = True):
    """Per row of a pair batch (chosen rows, then rejected): (sum of the answer tokens'
    log-probs, sum over the answer tokens of the mean logit over the vocabulary, answer tokens).
    `arrays` is either layout of mlxft.data.shared_prompt.pair_inputs."""
    if "mask" in arrays:
        hidden = shared_prompt_hidden(model, arrays["prompt_ids"], arrays["answer_ids"], arrays["mask"])
        logps, means, _ = hidden_scores(model, hidden, arrays["answer_ids"], chunk, grad=grad, extras=True)
    else:
        logps, means, _ = scores_at(model, arrays["inputs"], arrays["positions"], arrays["tokens"], split_head, chunk,
                                    grad=grad, extras=True)
    weights = arrays["weights"]
    return (logps * weights).sum(-1), (means * weights).sum(-1), weights.sum(-1)


def pair_loss(model, arrays: dict, reference, labels=None, *, split_head: bool, dc, chunk: int | None = None):
    """(sum of the DPO losses of the batch's pairs, their statistic sums) given reference log-prob
    sums (and, for KTO, the rows' labels)."""
    return pair_objective(*sequence_logps(model, arrays, split_head, chunk), reference, dc, xp=mx, detach=mx.stop_gradient,
                          labels=labels)


def make_reference_step(model, split_head: bool, chunk: int | None = None):
    """Compiled: reference log-prob sums [2B] of a pair batch, from the base model (adapter off).
    mx.compile reads `scale` and `training` while tracing, so this trace has the adapter off and
    the policy step's trace has it on; neither reads them again."""

    @partial(mx.compile, inputs=[model.state])
    def reference_step(arrays):
        with lora.adapter_off(model):
            logps = sequence_logps(model, arrays, split_head, chunk, grad=False)[0]
        return mx.stop_gradient(logps)

    return reference_step


def pair_arrays(batch, pad_id: int, shared: bool, pad_to_multiple: int | None = None) -> dict:
    """A pair batch's rows as the step takes them (mlxft.data.shared_prompt.pair_inputs)."""
    multiple = pad_to_multiple or (SHARED_PROMPT_PAD_MULTIPLE if shared else PAD_MULTIPLE)
    arrays = pair_inputs(batch, pad_id, shared=shared, pad_to_multiple=multiple, few_widths=SHARED_PROMPT_FEW_WIDTHS)
    return {k: mx.array(v) for k, v in arrays.items()}


def score_pairs(model, pairs, arrays_of, pad_id: int, split_head: bool, batch_size: int,
                chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob sums of every pair's chosen and rejected answer under the model as it is now."""
    chosen, rejected = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
    was_training = model.training
    model.eval()
    for batch in iterate_pair_batches(pairs, batch_size, pad_id, shuffle=False, pad_to_multiple=PAD_MULTIPLE):
        logps = np.array(mx.stop_gradient(sequence_logps(model, arrays_of(batch), split_head, chunk, grad=False)[0]))
        chosen[batch.index], rejected[batch.index] = logps[: batch.pairs], logps[batch.pairs :]
    model.train(was_training)
    return chosen, rejected
