"""Reward models on MLX: a LoRA adapter and a scalar head trained on preference pairs with the
Bradley-Terry loss (mlxft.reward), on the shared run driver. Reads top to bottom: setup -> model
-> data -> head -> optimizer -> loop -> save.

    mlxft reward --recipe reward                                  # built-in model, bundled preference sample
    mlxft reward --recipe reward --data data/mind-sample          # a clicked title preferred over a skipped one
    mlxft reward --recipe reward --model HuggingFaceTB/SmolLM2-135M-Instruct --data pairs.jsonl
    mlxft eval reward --model M --adapter runs/reward-.../best --data pairs.jsonl

Each pair runs as two rows, prompt + chosen and prompt + rejected; the head reads the hidden state
of each row's last token that is not padding (the LM head never runs). The saved adapter is PEFT's
SEQ_CLS layout (mlxft.adapters), which AutoModelForSequenceClassification + PeftModel load.

Supports: LoRA (QLoRA on quantized bases) with the head trained in full; starting from an SFT
adapter or continuing a reward adapter (--adapter); TRL's center_rewards_coefficient
(reward.center_coefficient); AdamW with warmup and cosine / linear / constant decay; gradient
accumulation weighted by pairs; clipping; validation every N steps with the best adapter kept and
early stopping; atomic checkpoints and --resume; data parallelism (--nproc); metrics.jsonl with
TRL's names (accuracy, margin; eval_ for validation) and summary.json.

Raises UserError for bad recipes, data, models and adapters, and NotImplementedYet for full
fine-tuning and for model families whose body mlxft cannot run without the LM head.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlxft import backends, driver
from mlxft.backends.mlx import PAD_MULTIPLE, checkpoint, steps
from mlxft.backends.mlx import model as mlx_model
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_pair_batches
from mlxft.distributed import World
from mlxft.dpo_common import encode_pairs
from mlxft.errors import NotImplementedYet
from mlxft.model_files import SPLIT_HEAD_TYPES
from mlxft.model_files import pad_id as pad_id_of
from mlxft.policy import build_policy, describe_policy
from mlxft.reward import (
    HEAD,
    STATISTICS,
    describe_reward,
    load_instructions,
    load_reward_data,
    reward_spec,
    saved_head,
    start_head,
    summarize,
)
from mlxft.runs import Run


def train(config: RunConfig, run: Run, *, resume: bool = False, adapter: str | None = None, echo=print,
          world: World = World()) -> dict:
    """Train as `config` says, writing into `run`; returns the summary (also in summary.json), or {}
    on a rank other than 0 of several (mlxft.distributed)."""
    tc, ec, rc = config.train, config.eval, config.reward
    backend = backends.get("mlx")

    # --- setup ---------------------------------------------------------------------------------
    mx.random.seed(tc.seed)
    mlx_model.configure_memory()
    splits = load_reward_data(config)  # rows first: a data mistake should not wait for a model

    # --- model and data --------------------------------------------------------------------------
    model, tokenizer, folder = mlx_model.load(config.model.name, quantize=config.model.quantize,
                                              trust_remote_code=config.model.trust_remote_code)
    if not mlx_model.can_split_head(model, folder):
        raise NotImplementedYet(f"model {folder}: reward models run on the families {', '.join(sorted(SPLIT_HEAD_TYPES))} for now")
    pad_id = pad_id_of(tokenizer)
    train_set, valid_set, truncated_pairs = encode_pairs(splits, tokenizer, config, echo, lengths=rc)

    # --- adapter and head ------------------------------------------------------------------------
    start_from = run.checkpoint_dir / "weights" if resume else adapter
    spec = reward_spec(build_policy(backend, model, config, folder, start_from=start_from, task_type=None))
    hidden = model.args.hidden_size
    setattr(model, HEAD, nn.Linear(hidden, 1, bias=False))  # trainable: build_policy froze the rest
    model.score.weight = mx.array(start_head(hidden, start_from, tc.seed))
    trainable, line = describe_policy(backend, model, folder, spec, config)
    echo(describe_reward(line, hidden, rc))
    echo(f"run folder: {run.folder}")

    # --- optimizer and step ----------------------------------------------------------------------
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
                            bias_correction=tc.bias_correction)
    start = driver.Start()
    if resume:  # before the step is compiled: it must capture the restored optimizer state
        start = driver.Start(*checkpoint.load(run, model, optimizer, full_finetune=False))
    loss = partial(steps.reward_loss, center_coefficient=rc.center_coefficient)
    micro_step, update = steps.make_step(model, optimizer, loss, tc.max_grad_norm)

    def validation_sums(pairs, rows) -> np.ndarray:
        return np.array(loss(model, *steps.reward_inputs(pairs, pad_id))[1])

    trainer = driver.Trainer(
        step=steps.train_step(model, optimizer, micro_step, update, lambda pairs: steps.reward_inputs(pairs, pad_id),
                              tc.seed, world, len(STATISTICS)),
        validate=driver.pair_validation(model, valid_set, validation_sums, summarize, statistics=len(STATISTICS),
                                        batch_size=ec.batch_size, pad_id=pad_id, pad_multiple=PAD_MULTIPLE, world=world),
        summarize=summarize,
        save_weights=lambda where: checkpoint.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: checkpoint.save(run, model, optimizer, spec, config, folder, *state),
        memory=mlx_model.memory_meter(),
    )

    # --- loop ----------------------------------------------------------------------------------
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_pair_batches, pad_id=pad_id,
                        pad_multiple=PAD_MULTIPLE, echo=echo, world=world)
    if not world.main:
        return {}

    # --- save ----------------------------------------------------------------------------------
    return driver.summarize_run(
        run, config, fitted, trainer, method="reward", backend="mlx", device=str(mx.default_device()), model=str(folder),
        trainable=trainable, setup={"center_coefficient": rc.center_coefficient},
        data={"train_pairs": len(train_set), "valid_pairs": len(valid_set), "truncated_pairs": truncated_pairs},
        outputs={"load_with": load_instructions(pad_id)})


def swapped_scorer(model, adapter: str, pad_id: int):
    """score(input_ids [N, T]) -> scores [N] (numpy) of a reward adapter (mlxft reward, trained on
    this model's base) run on the model being trained: its LoRA weights swapped in for the forward
    (lora.adapter_swapped) and its head kept outside the model, so that nothing of it trains.
    One copy of the base weights serves the policy, the reference and the reward model."""
    from mlxft.adapters import load_adapter
    from mlxft.backends.mlx import lora
    from mlxft.reward import TASK_TYPE, score_positions

    spec, weights = load_adapter(adapter, task_type=TASK_TYPE)
    head = head_of(adapter, model.args.hidden_size)

    def score(input_ids: np.ndarray) -> np.ndarray:
        with lora.adapter_swapped(model, weights, spec.scaling):
            return np.array(steps.reward_scores(model, mx.array(input_ids), mx.array(score_positions(input_ids, pad_id)), head))

    return score


def load_scorer(name: str, adapter: str, *, trust_remote_code: bool = False):
    """(tokenizer, score): a saved reward adapter on its base model, and a function from rows of
    token ids [N, T] (right-padded with the tokenizer's pad id) to their scores [N] (numpy)."""
    from mlxft.adapters import attach_adapter
    from mlxft.backends.mlx import lora
    from mlxft.reward import TASK_TYPE, score_positions

    model, tokenizer, folder = mlx_model.load(name, trust_remote_code=trust_remote_code)
    if not mlx_model.can_split_head(model, folder):
        raise NotImplementedYet(f"model {folder}: reward models run on the families {', '.join(sorted(SPLIT_HEAD_TYPES))} for now")
    attach_adapter(lora, model, adapter, task_type=TASK_TYPE)
    head = head_of(adapter, model.args.hidden_size)
    model.eval()
    pad_id = pad_id_of(tokenizer)

    def score(input_ids: np.ndarray) -> np.ndarray:
        return np.array(steps.reward_scores(model, mx.array(input_ids), mx.array(score_positions(input_ids, pad_id)), head))

    return tokenizer, score


def head_of(adapter: str, hidden_size: int) -> nn.Linear:
    """The reward head saved beside an adapter, as a layer outside the model (nothing trains it)."""
    head = nn.Linear(hidden_size, 1, bias=False)
    head.weight = mx.array(saved_head(adapter, hidden_size))
    return head
