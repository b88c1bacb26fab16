"""Online RL from prompts, backend-neutral: rollouts, rewards, advantages and the policy loss, as
TRL's GRPOTrainer and RLOOTrainer compute them. The trainers are mlxft.backends.<backend>.rl; the
loop is mlxft.driver's. No mlx and no torch here: numpy, and loss math over an `xp` namespace.

One optimizer step, for each of its micro-batches of prompts:
1. sample G completions per prompt from the policy (base + adapter), each prompt run once and its
   KV cache shared by its G completions (the backend's sampler);
2. score them with the reward functions (mlxft.rewards), weighted and added;
3. advantages within each prompt's group (mlxft.rollouts.group_advantages):
   grpo  A_i = (r_i − mean(r)) / (std(r) + 1e-4), or r_i − mean(r) without rl.scale_rewards (Dr. GRPO)
   rloo  A_i = r_i − mean of the other G − 1 rewards
   or, for PPO, per token from a value head on the policy's last hidden state (mlxft.rollouts.ppo_advantages, as
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

from dataclasses import dataclass

import numpy as np

from mlxft.data.encode import encode_prompt
from mlxft.errors import NotImplementedYet, UserError

# --- data ------------------------------------------------------------------------------------------


@dataclass
class PromptExample:
    ids: list[int]  # the rendered prompt's token ids
    row: int  # its row in the split (whose other fields the reward functions get)
    text: str  # the prompt as the reward functions see it (the row's prompt, before any template)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PromptBatch:
    examples: list[PromptExample]
    index: np.ndarray
    tokens: int = 0  # prompt + completion tokens trained on: known once the step has sampled

    @property
    def lengths(self) -> np.ndarray:
        """The prompts' lengths (a batch's rows, as mlxft.distributed counts them)."""
        return np.array([len(e) for e in self.examples], dtype=np.int32)


def load_rl_data(config, adapter=None, world=None):
    """(splits of prompt rows, the reward functions): everything that can be wrong before a model loads."""
    from mlxft.data.dataset import load_prompt_splits
    from mlxft.rewards import load_reward_function

    rc = config.rl
    rc.check()
    if world is not None and world.size > 1:
        raise NotImplementedYet("mlxft rl runs as one process for now; drop --nproc")
    if adapter and rc.beta:
        raise NotImplementedYet("--adapter with rl.beta > 0: the reference would be that adapter, which cannot be "
                                "switched off; set rl.beta=0, or start a new adapter")
    if config.lora.full_finetune:
        raise NotImplementedYet("mlxft rl trains a LoRA adapter (the reference is the model with it switched off); "
                                "full fine-tuning is not built for RL yet")
    if config.eval.metric != "reward":
        raise UserError(f"eval.metric '{config.eval.metric}' is not measured by RL; use eval.metric=reward")
    functions = [load_reward_function(spec) for spec in rc.reward_functions]
    if rc.reward_adapter:
        from mlxft.adapters import load_adapter

        load_adapter(rc.reward_adapter, task_type="SEQ_CLS")  # a wrong path or kind fails now
    return load_prompt_splits(config.data), functions


REWARD_MODEL = "reward_model"  # the reward adapter's name among the rewards


def reward_names(functions, rc) -> list[str]:
    return [name for name, _ in functions] + ([REWARD_MODEL] if rc.reward_adapter else [])


def reward_table(functions, reward_model, prompts, completions, columns, rows: np.ndarray) -> np.ndarray:
    """Rewards [rewards, N]: each function's, then the reward model's scores of the rows
    ([prompt | completion] ids, right-padded) when there is one."""
    from mlxft.rewards import score

    table = score(functions, prompts, completions, columns)
    if reward_model is not None:
        table = np.concatenate([table, np.asarray(reward_model(rows), dtype=np.float64)[None]])
    return table


def encode_prompts(splits, tokenizer, config, echo) -> tuple[list[PromptExample], list[PromptExample], int]:
    """(train prompts, validation prompts, train prompts cut), with the data line printed."""
    train_set, truncated = encode_prompt_split(splits.train, tokenizer, config)
    valid_set, _ = encode_prompt_split(splits.valid, tokenizer, config)
    echo(f"data {splits.source}: {len(train_set)} train / {len(valid_set)} valid prompts; {truncated} longer than "
         f"rl.max_prompt_length ({config.rl.max_prompt_length}) kept their end")
    return train_set, valid_set, truncated


def encode_prompt_split(records, tokenizer, config) -> tuple[list[PromptExample], int]:
    """(prompts, how many were longer than rl.max_prompt_length and lost their beginning)."""
    from mlxft.data.templates import preference_prompt, resolve_preference_template

    template = resolve_preference_template(config.data.template, records, tokenizer)
    limit = config.rl.max_prompt_length
    examples, truncated = [], 0
    for i, record in enumerate(records):
        ids = encode_prompt(tokenizer, preference_prompt(record, template, tokenizer, system_prompt=config.data.system_prompt))
        if limit is not None and len(ids) > limit:
            ids, truncated = ids[-limit:], truncated + 1
        prompt = record["prompt"]
        examples.append(PromptExample(ids, i, prompt if isinstance(prompt, str) else prompt[-1]["content"]))
    return examples, truncated


def iterate_prompt_batches(examples, batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                           pad_to_multiple: int = 1):
    """Batches of prompts in a seeded order (the driver's `iterate`; padding happens after sampling)."""
    order = np.random.default_rng(seed).permutation(len(examples)) if shuffle else np.arange(len(examples))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield PromptBatch([examples[i] for i in index], index)


def columns_of(records, rows) -> dict[str, list]:
    """The rows' fields other than the prompt, one list each, as TRL hands them to reward functions."""
    names = [k for k in records[rows[0]].fields if k != "prompt"]
    return {k: [records[r].get(k) for r in rows] for k in names}


def stop_ids(tokenizer) -> set[int]:
    """The tokens that end a completion: the tokenizer's end-of-sequence token(s)."""
    ids = getattr(tokenizer, "eos_token_ids", None) or tokenizer.eos_token_id  # mlx-lm's wrapper: a set
    return {int(i) for i in (ids if isinstance(ids, (set, list, tuple)) else [ids]) if i is not None}


def check_ppo(split_head: bool) -> None:
    if not split_head:
        raise NotImplementedYet("rl.algo=ppo reads the value head off the model's last hidden states, which mlxft "
                                "takes only from the model families it can split at the LM head (Llama, Qwen, "
                                "Mistral, ...); use rl.algo=grpo or rloo with this model")


def value_head_init(hidden_size: int, seed: int) -> np.ndarray:
    """PPO's value head [1, hidden] at the start (its bias starts at 0): as a reward head starts,
    drawn in numpy so that both backends begin from the same numbers."""
    from mlxft.reward import init_head

    return init_head(hidden_size, seed + 1)


# --- the loss --------------------------------------------------------------------------------------

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


def describe_rl(policy_line: str, rc, functions) -> str:
    names = reward_names(functions, rc)
    if rc.reward_adapter:
        names[-1] = f"{REWARD_MODEL} ({rc.reward_adapter}, on this model's weights)"
    return (f"{policy_line}; {rc.algo.upper()} ({rc.loss_type} loss), {rc.num_generations} completions per prompt of "
            f"at most {rc.max_completion_length} tokens, beta {rc.beta:g}; rewards: {', '.join(names)}")
