"""The steps of the PyTorch trainers: one optimizer step for any objective, and each method's loss.
The trainers (sft.py, dpo.py) and the bench run exactly these; the twins of
mlxft.backends.mlx.steps, with the same sums (see mlxft.train.driver).

An objective is a function loss_of(batch) -> (loss sum, sums): the loss summed over a micro-batch
(with its graph), and the detached vector of the method's statistic sums whose [0] is what the
loss is a sum over and [1] the loss sum. Each micro-batch's backward adds the gradient of its
loss sum to .grad; the step divides once by its sums[0].
"""

from __future__ import annotations

import numpy as np
import torch

from mlxft.backends.torch import PAD_MULTIPLE, SHARED_PROMPT_FEW_WIDTHS, SHARED_PROMPT_PAD_MULTIPLE, lora
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.model import scores_at, shared_prompt_hidden, token_scores
from mlxft.data import packing
from mlxft.data.batching import iterate_pair_batches, scored_targets
from mlxft.data.shared_prompt import pair_inputs
from mlxft.losses.dpo import pair_objective
from mlxft.losses.reward import reward_objective
from mlxft.losses.rl import policy_objective
from mlxft.models.heads import score_positions
from mlxft.train.distributed import World, empty, step_seed
from mlxft.train.driver import StepResult
from mlxft.train.first_step import TensorProbe, sample_points

# --- one optimizer step ----------------------------------------------------------------------------


def train_step(optimizer, loss_of, *, seed: int, max_grad_norm: float | None, world: World = World(), statistics: int = 2,
               inputs_of=None, updates: int = 1, passes_of=None, names: list[str] | None = None, sharded: bool = False):
    """The driver's step(step index, micro-batches, learning rate) -> StepResult: `loss_of(inputs)`
    of each micro-batch laid out by `inputs_of(batch)` (default: the batch itself), or of each of
    the passes `passes_of(batch)` lays it out as, one forward and backward each (online RL's
    rl.completions_per_pass). With several
    ranks each takes its share of every micro-batch, and the gradient and statistic sums
    (`statistics` of them) are added across ranks before the update divides by the global count:
    DDP's all-reduce, done once per optimizer step rather than per micro-batch. With `updates` > 1
    (online RL's rl.num_iterations) the micro-batches are laid out once and trained on that many
    times, one optimizer update each; the statistics sum over all of them. `names` name the
    optimizer's tensors, in its order, for the first steps' probes (mlxft.train.first_step). With
    `sharded` weights (train.fsdp) FSDP has averaged each gradient over the ranks in the backward
    pass (its reduce-scatter): only the statistic sums are added up here, and the update divides
    by the global count over the ranks, which gives the same sum over the count."""
    inputs_of = inputs_of or (lambda batch: batch)
    passes_of = passes_of or (lambda batch: [inputs_of(batch)])
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    names = names or [f"tensor {i}" for i in range(len(parameters))]

    def step(index: int, batches: list, rate: float, probe: bool = False) -> StepResult:
        torch.manual_seed(step_seed(seed, index, world.rank))  # resume-exact dropout noise
        mine = [batch for batch in map(world.shard, batches) if not empty(batch)]  # a rank may get no rows
        laid_out = [one for batch in mine for one in passes_of(batch)] if updates > 1 else None
        reported, probes = None, None
        for k in range(updates):
            sums, grad_norm, probed = one_update(laid_out or (one for batch in mine for one in passes_of(batch)), rate,
                                                 probe and k == 0)
            reported = sums if reported is None else reported + sums
            probes = probes or probed
        return StepResult(reported, grad_norm, rate, probes)

    def one_update(inputs, rate: float, probe: bool):
        optimizer.zero_grad(set_to_none=True)
        total = None
        for one in inputs:  # one at a time, when each is used once
            loss_sum, sums = loss_of(one)
            loss_sum.backward()
            total = sums if total is None else total + sums
        if world.size > 1 and sharded:
            import torch.distributed as dist

            total = (total if total is not None else torch.zeros(statistics)).float().cpu()
            dist.all_reduce(total)
        elif world.size > 1:
            import torch.distributed as dist

            device = parameters[0].device
            total = total if total is not None else torch.zeros(statistics, device=device)
            for p in parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1).float() for p in parameters] + [total.float()])
            if dist.get_backend() != "nccl":  # gloo reduces CPU tensors only (not MPS ones)
                flat = flat.cpu()
            dist.all_reduce(flat)  # one call, one buffer: gradients, then the statistic sums
            flat = flat.to(device)
            offset = 0
            for p in parameters:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            total = flat[offset:]
        sums = total.cpu().numpy()  # one device sync per update
        before = probe_before(parameters) if probe else None
        count = float(sums[0]) / (world.size if sharded else 1)  # FSDP's gradients are already means over the ranks
        grad_norm = update(optimizer, count, rate, max_grad_norm)
        return sums, grad_norm, probe_after(names, parameters, *before) if probe else None

    return step


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: FSDP's shard of it (a DTensor) gathered from every rank, which every rank
    must then call in step; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def probe_before(parameters) -> tuple:
    """What a probe reads before the update (mlxft.train.first_step): per tensor its largest |gradient|,
    whether the gradient is finite, and the weights at the sampled points and the largest gradient's.
    Sharded tensors are read whole: a shard's rows may all be ones the batch never reached."""
    points, values, read = [], [], []
    for p in parameters:
        g = whole(p.grad).reshape(-1).float().abs() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
        at = torch.cat([g.argmax().reshape(1), torch.tensor(list(sample_points(p.numel())), device=p.device)])
        points.append(at)
        values.append(whole(p.detach()).reshape(-1)[at].clone())
        read.append(torch.stack([g.max(), torch.isfinite(g).all().float()]))
    return points, values, torch.stack(read).cpu().tolist() if read else []


@torch.no_grad()
def probe_after(names, parameters, points, before, read) -> list[TensorProbe]:
    """TensorProbes from probe_before's readings and the weights after the update."""
    moved = [bool((whole(p.detach()).reshape(-1)[at] != was).any()) for p, at, was in zip(parameters, points, before)]
    return [TensorProbe(name, gradient, bool(finite), m) for name, (gradient, finite), m in zip(names, read, moved)]


def update(optimizer, count: float, rate: float, max_grad_norm: float | None) -> float:
    """Gradient sums / what the step's loss sums over, clipped (MLX's formula: scale by
    min(1, max_norm / (norm + 1e-6))), then one AdamW step at `rate`. Returns the norm before clipping."""
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    for p in parameters:
        p.grad.div_(count)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = rate
    optimizer.step()
    return whole(norm).item()


# --- supervised fine-tuning ----------------------------------------------------------------------


def sft_loss(model, batch, *, split_head: bool, device, chunk: int | None = None):
    """(cross-entropy sum over the scored tokens, [scored tokens, that sum] detached)."""
    targets = scored_targets(batch)
    inputs, positions, tokens, weights = torch_model.to_device(device, batch.input_ids[:, :-1], targets.positions,
                                                               targets.tokens, targets.weights)
    with torch_model.autocast(device):
        loss_sum, n_tokens = torch_model.token_losses(model, inputs, positions, tokens, weights, split_head, chunk)
    return loss_sum, torch.stack([n_tokens.detach(), loss_sum.detach()])


def packed_sft_loss(model, batch, *, device, chunk: int | None = None):
    """sft_loss of packed rows (mlxft.data.packing): each example attends only to itself and
    counts its positions from 0."""
    targets = scored_targets(batch)
    segments = batch.segment_ids[:, :-1]
    inputs, mask, segment_positions, positions, tokens, weights = torch_model.to_device(
        device, batch.input_ids[:, :-1], packing.block_mask(segments), packing.segment_positions(segments), targets.positions,
        targets.tokens, targets.weights)
    with torch_model.autocast(device):
        hidden = torch_model.block_masked_hidden_at(model, inputs, mask, segment_positions, positions)
        losses = -token_scores(model, hidden, tokens, chunk) * weights
    return losses.sum(), torch.stack([weights.sum().detach(), losses.sum().detach()])


# --- online RL -------------------------------------------------------------------------------------


def token_logps(model, inputs, positions, tokens, split_head: bool, chunk: int | None = None):
    """(log-probs [N, K] of the scored tokens, their entropies [N, K], detached)."""
    logps, _, entropy = scores_at(model, inputs, positions, tokens, split_head, chunk, extras=True)
    return logps, entropy


def token_logps_values(model, inputs, positions, tokens, chunk: int | None = None):
    """(log-probs [N, K], entropies [N, K], PPO's values [N, K]): the LM head and the value head
    (float32) on the same hidden states, from one forward."""
    hidden = torch_model.hidden_at(model, inputs, positions)
    logps, _, entropy = token_scores(model, hidden, tokens, chunk, extras=True)
    return logps, entropy, model.value_head(hidden.float())[..., 0]


def rl_loss(model, inputs, positions, tokens, weights, reference, old_logps, old_values, advantages, returns, carried, *,
            split_head: bool, rc, chunk: int | None = None):
    """(the policy loss sum of a rollout's completions, mlxft.losses.rl statistic sums detached): the
    loss statistics, the completion tokens' entropy, then the rollout's reward sums (`carried`).
    `old_logps` count from a second update on a rollout (rl.num_iterations), `old_values` and
    `returns` for PPO only; they are zeros otherwise."""
    values = None
    if rc.algo == "ppo":
        logps, entropy, values = token_logps_values(model, inputs, positions, tokens, chunk)
    else:
        logps, entropy = token_logps(model, inputs, positions, tokens, split_head, chunk)
    loss_sum, sums = policy_objective(logps, reference, weights, advantages, rc, xp=torch, detach=torch.Tensor.detach,
                                      old_logps=old_logps if rc.num_iterations > 1 else None, values=values,
                                      old_values=old_values, returns=returns)
    return loss_sum, torch.cat([sums, (entropy * weights).sum()[None], carried])


@torch.no_grad()
def old_policy_outputs(model, inputs, positions, tokens, *, split_head: bool, ppo: bool, chunk: int | None = None):
    """The policy's log-probs [N, K] of a rollout's completion tokens as it was when it sampled them
    (π_old of a later update), and for PPO its values [N, K] (else zeros)."""
    if ppo:
        logps, _, values = token_logps_values(model, inputs, positions, tokens, chunk)
        return logps, values
    logps = scores_at(model, inputs, positions, tokens, split_head, chunk)  # no entropy needed
    return logps, torch.zeros_like(logps)


@torch.no_grad()
def reference_token_logps(model, inputs, positions, tokens, *, split_head: bool, chunk: int | None = None) -> torch.Tensor:
    """The reference's log-probs [N, K] of a rollout's completion tokens, from the base model (adapter off)."""
    with lora.adapter_off(model):
        return scores_at(model, inputs, positions, tokens, split_head, chunk)


# --- reward models ---------------------------------------------------------------------------------


def reward_scores(model, input_ids, positions, head=None):
    """Scores [N] of whole rows: the reward head (`head`, else `model.score`; float32) on the
    hidden state at each row's position (mlxft.models.heads.score_positions)."""
    hidden = model.model(input_ids=input_ids).last_hidden_state
    hidden = hidden[torch.arange(len(positions), device=hidden.device), positions]
    return (head or model.score)(hidden.float())[:, 0]


def reward_loss(model, pairs, *, pad_id: int, center_coefficient: float, device):
    """(sum of the Bradley-Terry losses of a pair batch, mlxft.losses.reward.STATISTICS sums detached)."""
    ids = pairs.batch.input_ids
    input_ids, positions = torch_model.to_device(device, ids, score_positions(ids, pad_id))
    with torch_model.autocast(device):
        scores = reward_scores(model, input_ids, positions)
    return reward_objective(scores.float(), center_coefficient, xp=torch, detach=torch.Tensor.detach)


# --- DPO -----------------------------------------------------------------------------------------


def sequence_logps(model, tensors: dict, split_head: bool, chunk: int | None = None):
    """Per row of a pair batch (chosen rows, then rejected): (sum of the answer tokens'
    log-probs, sum over the answer tokens of the mean logit over the vocabulary (detached: a
    metric), answer tokens). `tensors` is either layout of mlxft.data.shared_prompt.pair_inputs."""
    if "mask" in tensors:
        hidden = shared_prompt_hidden(model, tensors["prompt_ids"], tensors["answer_ids"], tensors["mask"])
        logps, means, _ = token_scores(model, hidden, tensors["answer_ids"], chunk, extras=True)
    else:
        logps, means, _ = scores_at(model, tensors["inputs"], tensors["positions"], tensors["tokens"], split_head, chunk,
                                    extras=True)
    weights = tensors["weights"]
    return (logps * weights).sum(-1), (means * weights).sum(-1), weights.sum(-1)


def pair_loss(model, tensors: dict, reference, labels=None, *, split_head: bool, dc, chunk: int | None = None):
    """(sum of the DPO losses of the batch's pairs, their statistic sums) given reference log-prob
    sums (and, for KTO, the rows' labels)."""
    return pair_objective(*sequence_logps(model, tensors, split_head, chunk), reference, dc, xp=torch, detach=torch.Tensor.detach,
                          labels=labels)


@torch.no_grad()
def reference_logps(model, tensors: dict, *, split_head: bool, chunk: int | None = None) -> torch.Tensor:
    """Reference log-prob sums [2B] of a pair batch, from the base model (adapter off)."""
    with lora.adapter_off(model):
        return sequence_logps(model, tensors, split_head, chunk)[0]


def pair_tensors(batch, pad_id: int, shared: bool, device, pad_to_multiple: int | None = None) -> dict:
    """A pair batch's rows as the step takes them (mlxft.data.shared_prompt.pair_inputs)."""
    multiple = pad_to_multiple or (SHARED_PROMPT_PAD_MULTIPLE if shared else PAD_MULTIPLE)
    arrays = pair_inputs(batch, pad_id, shared=shared, pad_to_multiple=multiple, few_widths=SHARED_PROMPT_FEW_WIDTHS)
    return dict(zip(arrays, torch_model.to_device(device, *arrays.values())))


@torch.no_grad()
def score_pairs(model, pairs, tensors_of, pad_id: int, split_head: bool, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob sums of every pair's chosen and rejected answer under the model as it is now."""
    chosen, rejected = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
    was_training = model.training
    model.eval()
    for batch in iterate_pair_batches(pairs, batch_size, pad_id, shuffle=False, pad_to_multiple=PAD_MULTIPLE):
        with torch_model.autocast(device):
            logps = sequence_logps(model, tensors_of(batch), split_head)[0].float().cpu().numpy()
        chosen[batch.index], rejected[batch.index] = logps[: batch.pairs], logps[batch.pairs :]
    model.train(was_training)
    return chosen, rejected
