"""Online RL's math, backend-neutral: advantages and the policy loss, as TRL's GRPOTrainer and
RLOOTrainer compute them, with the reward sums a step carries. The run is mlxft.methods.rl, its rollouts
mlxft.methods.rollouts. No mlx and no torch here: numpy, and loss math over an `xp` namespace.

One optimizer step, for each of its micro-batches of prompts:
1. sample G completions per prompt from the policy (base + adapter), each prompt run once and its
   KV cache shared by its G completions (the backend's sampler);
2. score them with the reward functions (mlxft.rewards), weighted and added;
3. advantages within each prompt's group (mlxft.losses.rl.group_advantages):
   grpo  A_i = (r_i − mean(r)) / (std(r) + 1e-4), or r_i − mean(r) without rl.scale_rewards (Dr. GRPO)
   rloo  A_i = r_i − mean of the other G − 1 rewards
   or, for PPO, per token from a value head on the policy's last hidden state (mlxft.losses.rl.ppo_advantages, as
   TRL's PPOTrainer and the RLHF of GIRL and InstructGPT): the reward r_i at the completion's last
   token, −β·(log π_old − log π_ref) at every token, GAE(γ, λ) against the rollout's values, then
   whitened over the batch's tokens;
4. the loss over the completion tokens (policy_objective), with ρ = π/π_old the policy ratio and
   KL the k3 estimate exp(ref − logπ) − (ref − logπ) − 1 against the reference (the base model,
   adapter off, as DPO's):
   per token  −min(ρA, clip(ρ, 1 − ε, 1 + ε_high)A) + β·KL
   (PPO: the KL is in the reward instead, and the clipped value loss
   c_v · ½·max((V − R)², (clip(V, V_old ± rl.cliprange_value) − R)²) joins it, R the GAE returns)
   averaged (rl.loss_type) per completion then over completions (grpo), over completions × the
   completion budget (dr_grpo), or over all tokens of the step (dapo).

Each rollout batch is trained on rl.num_iterations times (TRL's num_iterations, PPO's epochs), the
updates of one optimizer step of the driver. With one, π_old is the policy itself, ρ = 1 and no
token is clipped: the gradient is the policy gradient. With more, π_old (and PPO's V_old) come from
a forward pass without gradients when the rollout is made.
"""

from __future__ import annotations

import numpy as np

# Computed in the loss: [0] what the loss is averaged over (completions, or tokens for dapo), then
# sums over the completions and their tokens.
LOSS_STATISTICS = ("count", "loss", "completions", "completion_tokens", "kl", "clipped", "value_loss", "entropy")


# Computed from the rewards before the loss runs, carried through it as a constant input.
CARRIED = ("reward", "reward_squares", "group_std", "zero_std_groups", "groups", "truncated")


def clip(x, low: float, high: float, xp):
    return xp.minimum(xp.maximum(x, xp.zeros_like(x) + low), xp.zeros_like(x) + high)


def policy_objective(logps, reference, weights, advantages, rc, *, xp, detach, old_logps=None, values=None,
                     old_values=None, returns=None):
    """(the loss sum, LOSS_STATISTICS sums but entropy) of completion tokens: per-token log-probs
    under the policy `logps` [N, K], the reference's [N, K], `weights` [N, K] (1 on completion
    tokens) and advantages [N] (PPO: [N, K]). The old policy's log-probs are `old_logps`, or with
    None the policy itself (one update per rollout). PPO also gives the value head's `values`
    [N, K], the rollout's `old_values` and the GAE `returns`."""
    ratio = xp.exp(logps - (detach(logps) if old_logps is None else old_logps))
    advantage = advantages[:, None] if len(advantages.shape) == 1 else advantages
    high = rc.epsilon if rc.epsilon_high is None else rc.epsilon_high
    per_token = -xp.minimum(ratio * advantage, clip(ratio, 1 - rc.epsilon, 1 + high, xp) * advantage)
    delta = reference - logps
    kl = xp.exp(delta) - delta - 1
    if rc.beta and rc.algo != "ppo":  # PPO's KL is a penalty in its reward (ppo_advantages)
        per_token = per_token + rc.beta * kl
    value_loss = xp.zeros_like(weights)
    if values is not None:
        moved = clip(values, old_values - rc.cliprange_value, old_values + rc.cliprange_value, xp)
        value_loss = 0.5 * xp.maximum((values - returns) ** 2, (moved - returns) ** 2) * weights
        per_token = per_token + rc.vf_coef * value_loss
    per_token = per_token * weights
    tokens = weights.sum(-1)
    completions = xp.zeros_like(tokens).sum() + tokens.shape[0]
    if rc.loss_type == "grpo":
        loss_sum, count = (per_token.sum(-1) / xp.maximum(tokens, xp.zeros_like(tokens) + 1)).sum(), completions
    elif rc.loss_type == "dr_grpo":
        loss_sum, count = per_token.sum() / rc.max_completion_length, completions
    else:  # dapo: every token of the step weighs the same
        loss_sum, count = per_token.sum(), tokens.sum()
    ratio_d = detach(ratio)
    advantage_d = detach(advantage) + xp.zeros_like(ratio_d)
    clipped = (((ratio_d < 1 - rc.epsilon) & (advantage_d < 0)) | ((ratio_d > 1 + high) & (advantage_d > 0))) * weights
    kl_sum = (detach(kl) * weights).sum() if rc.beta else xp.zeros_like(tokens).sum()  # no reference run: not measured
    sums = [count, detach(loss_sum), completions, tokens.sum(), kl_sum, clipped.sum(), detach(value_loss).sum()]
    return loss_sum, xp.stack([detach(s) for s in sums])


def reward_sums_size(function_count: int) -> int:
    """The length of reward_sums' array for this many reward functions."""
    return len(CARRIED) + 2 * function_count


def reward_sums(total: np.ndarray, table: np.ndarray, g: int, truncated: int) -> np.ndarray:
    """CARRIED sums, then each function's reward sum and sum of squares."""
    groups = total.reshape(-1, g)
    stds = groups.std(axis=1, ddof=1) if g > 1 else np.zeros(len(groups))  # PPO may sample one per prompt
    carried = [total.sum(), (total ** 2).sum(), stds.sum(), float((stds == 0).sum()), len(groups), truncated]
    for row in table:
        carried += [row.sum(), (row ** 2).sum()]
    return np.asarray(carried, dtype=np.float32)


def statistic_names(function_names: list[str]) -> tuple[str, ...]:
    return LOSS_STATISTICS + CARRIED + tuple(f"{n}/{part}" for n in function_names for part in ("sum", "squares"))


def summarizer(function_names: list[str], ppo: bool = False):
    """summarize(sums) -> metrics under TRL's names, for the driver (with PPO's value loss)."""
    names = statistic_names(function_names)

    def summarize(sums) -> dict:
        s = dict(zip(names, (float(v) for v in sums)))
        n, tokens = max(s["completions"], 1.0), max(s["completion_tokens"], 1.0)
        metrics = {"loss": s["loss"] / max(s["count"], 1.0), "reward": s["reward"] / n,
                   "reward_std": s["group_std"] / max(s["groups"], 1.0),
                   "frac_reward_zero_std": s["zero_std_groups"] / max(s["groups"], 1.0)}
        for name in function_names:
            mean = s[f"{name}/sum"] / n
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = max(s[f"{name}/squares"] / n - mean ** 2, 0.0) ** 0.5
        metrics.update({"kl": s["kl"] / tokens, "clip_ratio": s["clipped"] / tokens, "entropy": s["entropy"] / tokens,
                        "completions/mean_length": s["completion_tokens"] / n, "completions/clipped_ratio": s["truncated"] / n})
        if ppo:
            metrics["value_loss"] = s["value_loss"] / tokens
        return metrics

    return summarize


def group_advantages(rewards: np.ndarray, g: int, algo: str = "grpo", scale_rewards: bool = True) -> np.ndarray:
    """Advantages [N] of rewards [N] laid out as consecutive groups of g completions of one prompt."""
    groups = np.asarray(rewards, dtype=np.float64).reshape(-1, g)
    mean = groups.mean(axis=1, keepdims=True)
    if algo == "rloo":  # baseline: the mean of the other g - 1
        return ((groups - mean) * g / (g - 1)).reshape(-1)
    advantages = groups - mean
    if scale_rewards:  # the unbiased std, as torch.std and TRL compute it
        advantages = advantages / (groups.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return advantages.reshape(-1)


def ppo_advantages(scores, logps, reference, values, weights, rc) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns), each [N, K] float32, of PPO over the completion tokens (`weights` 1,
    left-aligned, as the loss scores them): the per-token reward −β·(log π_old − log π_ref) plus the
    completion's score at its last token; GAE(γ, λ) on the rollout's values (0 after the last token);
    returns = advantages + values; advantages whitened over the batch's tokens (TRL's masked_whiten)."""
    w = np.asarray(weights, np.float64)
    values = np.asarray(values, np.float64) * w
    rewards = -rc.beta * (np.asarray(logps, np.float64) - np.asarray(reference, np.float64)) * w
    last = np.maximum(w.sum(1).astype(int) - 1, 0)
    rewards[np.arange(len(last)), last] += np.asarray(scores, np.float64)
    advantages, running = np.zeros_like(rewards), np.zeros(len(last))
    for t in reversed(range(w.shape[1])):  # padding sits after the last token: it adds nothing
        following = values[:, t + 1] if t + 1 < w.shape[1] else 0.0
        running = rewards[:, t] + rc.gamma * following - values[:, t] + rc.gamma * rc.lam * running
        advantages[:, t] = running
    advantages *= w
    returns = advantages + values
    n = max(w.sum(), 1.0)
    mean = advantages.sum() / n
    variance = (((advantages - mean) * w) ** 2).sum() / max(n - 1, 1.0)  # unbiased, as TRL's masked_var
    whitened = (advantages - mean) / np.sqrt(variance + 1e-8) * w
    return whitened.astype(np.float32), returns.astype(np.float32)
