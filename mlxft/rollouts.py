"""One online-RL rollout and what a trainer does with it (the algorithm is mlxft.rl's docstring):
sample G completions per prompt, score them, advantages per group (or PPO's per token), the rows
cut into passes (rl.completions_per_pass), held-out rewards of greedy completions, and
completions.jsonl. Backend-neutral: a backend hands in its samplers and reward-model scorer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxft.data.batching import Batch, collate
from mlxft.data.encode import Example
from mlxft.rl import PromptBatch, columns_of, reward_names, reward_sums, reward_table


@dataclass
class Rollout:
    batch: Batch  # G rows per prompt, [prompt | completion], right-padded; the completion is scored
    advantages: np.ndarray | None  # [N] float32; None for PPO, whose advantages are per token (ppo_advantages)
    scores: np.ndarray  # [N] the weighted sum of the rewards
    carried: np.ndarray  # [len(CARRIED) + 2F] float32: reward statistic sums (see statistic_names)
    prompts: list[str]
    completions: list[str]
    rewards: np.ndarray  # [F, N]


def make_rollout(batch: PromptBatch, sample, tokenizer, records, functions, rc, pad_id: int, pad_multiple: int,
                 stop: set[int], reward_model=None) -> Rollout:
    """Sample, score and lay out one micro-batch of prompts. `sample(prompt_ids, n)` is the
    backend's sampler: n completions of one prompt, each a list of ids ending at a stop token or
    at rl.max_completion_length; `reward_model(rows)` the reward adapter's scorer, if any."""
    g = rc.num_generations
    examples, prompts, completions, rows, truncated = [], [], [], [], 0
    for prompt in batch.examples:
        for ids in sample(prompt.ids, g):
            truncated += not (ids and ids[-1] in stop)
            examples.append(Example(list(prompt.ids) + list(ids), [0] * len(prompt.ids) + [1] * len(ids)))
            completions.append(tokenizer.decode([i for i in ids if i not in stop]))
            prompts.append(prompt.text)
            rows.append(prompt.row)
    collated = collate(examples, pad_id, pad_multiple)
    table = reward_table(functions, reward_model, prompts, completions, columns_of(records, rows), collated.input_ids)
    weights = np.asarray(rc.reward_weights if rc.reward_weights is not None else [1.0] * len(table))
    total = weights @ table
    advantages = None if rc.algo == "ppo" else group_advantages(total, g, rc.algo, rc.scale_rewards).astype(np.float32)
    batch.tokens = int(collated.lengths.sum())
    return Rollout(collated, advantages, total.astype(np.float32), reward_sums(total, table, g, truncated), prompts,
                   completions, table)


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


def advantages_of(rollout: Rollout, old_logps, reference, old_values, weights, rc) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) of a rollout as the loss takes them (numpy): PPO's per token, from the
    rollout forward's log-probs and values; the group advantages [N] otherwise (returns unused: 0)."""
    if rc.algo == "ppo":
        return ppo_advantages(rollout.scores, old_logps, reference, old_values, weights, rc)
    return rollout.advantages, np.zeros(np.shape(weights), np.float32)


def row_passes(rows: int, per_pass: int | None) -> list[slice]:
    """A rollout's rows in passes of at most `per_pass` (rl.completions_per_pass; None: one pass).
    The policy objective is a sum over rows, so the passes' gradient and statistic sums add up to
    the single pass's; only the memory of the activations shrinks."""
    per_pass = per_pass or rows
    return [slice(start, min(start + per_pass, rows)) for start in range(0, rows, per_pass)]


def split_passes(row_arrays: tuple, carried, no_carried, passes: list[slice]) -> list[tuple]:
    """The trainer's inputs of each pass: every array sliced to the pass's rows, and the rollout's
    reward sums (`carried`) in the first pass only, so that they are counted once."""
    return [(*(a[rows] for a in row_arrays), carried if i == 0 else no_carried) for i, rows in enumerate(passes)]


# --- validation and the completions log --------------------------------------------------------------


def validation_metrics(examples, records, sample_greedy, tokenizer, functions, rc, stop, pad_id: int,
                       reward_model=None) -> dict:
    """eval_reward and each reward's mean over one greedy completion per held-out prompt."""
    if not examples:
        return {}
    completions, lengths, rows = [], [], []
    for prompt in examples:
        ids = sample_greedy(prompt.ids)
        lengths.append(len(ids))
        completions.append(tokenizer.decode([i for i in ids if i not in stop]))
        rows.append(Example(list(prompt.ids) + list(ids), [0] * len(prompt.ids) + [1] * len(ids)))
    table = reward_table(functions, reward_model, [p.text for p in examples], completions,
                         columns_of(records, [p.row for p in examples]), collate(rows, pad_id).input_ids)
    weights = np.asarray(rc.reward_weights if rc.reward_weights is not None else [1.0] * len(table))
    metrics = {"eval_reward": float((weights @ table).mean())}
    for name, row in zip(reward_names(functions, rc), table):
        metrics[f"eval_rewards/{name}/mean"] = float(row.mean())
    metrics["eval_completions/mean_length"] = float(np.mean(lengths))
    return metrics


@dataclass
class CompletionLog:
    """completions.jsonl: every `every` steps, each completion the step sampled, with its prompt,
    rewards and advantage (TRL's log_completions). A resumed run drops the lines
    after its checkpoint, as metrics.jsonl does."""

    path: Path
    every: int
    function_names: list[str] = field(default_factory=list)

    def truncate(self, step: int) -> None:
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            from mlxft.files import write_atomic

            write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, rollout: Rollout) -> None:
        if not self.every or step % self.every:
            return
        with self.path.open("a") as f:
            for i, (prompt, completion) in enumerate(zip(rollout.prompts, rollout.completions)):
                rewards = {name: float(rollout.rewards[k, i]) for k, name in enumerate(self.function_names)}
                line = {"step": step, "prompt": prompt, "completion": completion, "rewards": rewards}
                if rollout.advantages is not None:  # PPO's are per token
                    line["advantage"] = float(rollout.advantages[i])
                f.write(json.dumps(line) + "\n")


@dataclass
class Rollouts:
    """What a trainer's rollouts need besides its step, set up once per run: `sample(prompt_ids, n)`
    and `greedy(prompt_ids)` are the backend's samplers, `reward_model(rows)` its reward adapter's
    scorer or None. `step` is the optimizer step being taken, for completions.jsonl."""

    sample: object
    greedy: object
    tokenizer: object
    splits: object
    valid_set: list
    functions: list
    rc: object
    pad_id: int
    pad_multiple: int
    stop: set
    reward_model: object
    log: CompletionLog
    step: int = 0

    def make(self, batch: PromptBatch) -> Rollout:
        rollout = make_rollout(batch, self.sample, self.tokenizer, self.splits.train, self.functions, self.rc, self.pad_id,
                               self.pad_multiple, self.stop, self.reward_model)
        self.log.write(self.step, rollout)
        return rollout

    def validate(self) -> dict:
        return validation_metrics(self.valid_set, self.splits.valid, self.greedy, self.tokenizer, self.functions, self.rc,
                                  self.stop, self.pad_id, self.reward_model)

    def counting(self, optimizer_step):
        """The driver's step: `optimizer_step`, with `step` kept up to date for the log."""

        def step(index: int, batches: list, rate: float, probe: bool = False):
            self.step = index + 1
            return optimizer_step(index, batches, rate, probe=probe)

        return step
