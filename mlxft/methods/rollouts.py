"""One online-RL rollout and what a trainer does with it (the algorithm is mlxft.losses.rl's docstring):
sample G completions per prompt, score them, advantages per group (or PPO's per token), the rows
cut into passes (rl.completions_per_pass), held-out rewards of greedy completions, and
completions.jsonl. Backend-neutral: a backend hands in its samplers and reward-model scorer.

Its data too: the prompts, in batches, and the reward functions' names and table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxft.data.batching import Batch, collate
from mlxft.data.encode import Example, encode_prompt
from mlxft.errors import NotImplementedYet, UserError
from mlxft.losses.rl import group_advantages, ppo_advantages, reward_sums

# --- prompts and rewards ---------------------------------------------------------------------------

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
        """The prompts' lengths (a batch's rows, as mlxft.train.distributed counts them)."""
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
        from mlxft.models.adapters import load_adapter

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


# --- a rollout -------------------------------------------------------------------------------------

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


def advantages_of(rollout: Rollout, old_logps, reference, old_values, weights, rc) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) of a rollout as the loss takes them (numpy): PPO's per token, from the
    rollout forward's log-probs and values; the group advantages [N] otherwise (returns unused: 0)."""
    if rc.algo == "ppo":
        return ppo_advantages(rollout.scores, old_logps, reference, old_values, weights, rc)
    return rollout.advantages, np.zeros(np.shape(weights), np.float32)


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
