"""Reward models, on either backend: a LoRA adapter and a scalar head trained on preference pairs
with the Bradley-Terry loss (mlxft.losses.reward), on the shared run driver. Reads top to bottom: setup
-> model -> data -> head -> optimizer -> loop -> save.

    mlxft reward --recipe reward                                  # built-in model, bundled preference sample
    mlxft reward --recipe reward --data data/mind-sample          # a clicked title preferred over a skipped one
    mlxft reward --recipe reward --model HuggingFaceTB/SmolLM2-135M-Instruct --data pairs.jsonl --backend torch
    mlxft eval reward --model M --adapter runs/reward-.../best --data pairs.jsonl

Each pair runs as two rows, prompt + chosen and prompt + rejected; the head reads the hidden state
of each row's last token that is not padding (the LM head never runs). The saved adapter is PEFT's
SEQ_CLS layout (mlxft.models.adapters), which AutoModelForSequenceClassification + PeftModel load.

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

import numpy as np

from mlxft.backends import engine_for
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_pair_batches
from mlxft.errors import NotImplementedYet, UserError
from mlxft.losses.reward import STATISTICS, reward_objective, summarize
from mlxft.methods.dpo import encode_pairs
from mlxft.models.files import SPLIT_HEAD_TYPES
from mlxft.models.files import pad_id as pad_id_of
from mlxft.models.heads import reward_spec, start_head
from mlxft.train import driver
from mlxft.train.distributed import World
from mlxft.train.policy import build_policy, describe_policy
from mlxft.train.runs import Run


def train(config: RunConfig, run: Run, *, backend: str = "mlx", resume: bool = False, adapter: str | None = None,
          echo=print, world: World = World()) -> dict:
    """Train as `config` says on `backend` ('mlx' or 'torch'), writing into `run`; returns the
    summary (also in summary.json), or {} on a rank other than 0 of several (mlxft.train.distributed)."""
    tc, ec, rc = config.train, config.eval, config.reward
    engine = engine_for(backend)

    # --- setup ---------------------------------------------------------------------------------
    engine.start(tc.seed)
    splits = load_reward_data(config)  # rows first: a data mistake should not wait for a model

    # --- model and data --------------------------------------------------------------------------
    model, tokenizer, folder = engine.load(config.model)
    if not engine.can_split_head(model, folder):
        raise NotImplementedYet(f"model {folder}: reward models run on the families {', '.join(sorted(SPLIT_HEAD_TYPES))} for now")
    pad_id = pad_id_of(tokenizer)
    train_set, valid_set, truncated_pairs = encode_pairs(splits, tokenizer, config, echo, lengths=rc)

    # --- adapter and head ------------------------------------------------------------------------
    start_from = run.checkpoint_dir / "weights" if resume else adapter
    spec = reward_spec(build_policy(engine, model, config, folder, start_from=start_from, task_type=None))
    hidden = engine.hidden_size(model)
    engine.add_reward_head(model, start_head(hidden, start_from, tc.seed))  # trainable: build_policy froze the rest
    trainable, line = describe_policy(engine, model, folder, spec, config, where=engine.where)
    echo(describe_reward(line, hidden, rc))
    echo(f"run folder: {run.folder}")

    # --- optimizer and step ----------------------------------------------------------------------
    optimizer = engine.optimizer(model, tc)
    start = engine.resume(run, model, optimizer, config) if resume else driver.Start()  # before the step is built
    step = engine.reward_step(model, optimizer, config, pad_id=pad_id, world=world)
    trainer = driver.Trainer(
        step=step.step,
        validate=driver.pair_validation(model, valid_set, step.validation_sums, summarize, statistics=len(STATISTICS),
                                        batch_size=ec.batch_size, pad_id=pad_id, pad_multiple=engine.pad_multiple,
                                        world=world),
        summarize=summarize,
        save_weights=lambda where: engine.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: engine.save_checkpoint(run, model, optimizer, spec, config, folder, *state),
        memory=engine.memory_meter(),
    )

    # --- loop ----------------------------------------------------------------------------------
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_pair_batches, pad_id=pad_id,
                        pad_multiple=engine.pad_multiple, echo=echo, world=world)
    if not world.main:
        return {}

    # --- save ----------------------------------------------------------------------------------
    return driver.summarize_run(
        run, config, fitted, trainer, method="reward", backend=engine.name, device=engine.device, model=str(folder),
        trainable=trainable, setup={"center_coefficient": rc.center_coefficient},
        data={"train_pairs": len(train_set), "valid_pairs": len(valid_set), "truncated_pairs": truncated_pairs},
        outputs={"load_with": load_instructions(pad_id)})


# --- the run, before and after its model ------------------------------------------------------------


def load_instructions(pad_id: int) -> str:
    """How to load a saved reward adapter in transformers + PEFT (printed after training)."""
    return (f"AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id={pad_id}); "
            "PeftModel.from_pretrained(model, adapter)")


def check_reward_run(config) -> None:
    """What a reward run cannot do yet, said before a model loads."""
    from mlxft.errors import NotImplementedYet

    if config.lora.full_finetune:
        raise NotImplementedYet("reward models train a LoRA adapter and the head; full fine-tuning of a reward model "
                                "is not built yet (drop lora.full_finetune)")
    if config.eval.metric not in ("loss", "accuracy", "margin"):
        raise UserError(f"eval.metric '{config.eval.metric}' is not a reward model metric; use loss, accuracy or margin")


def load_reward_data(config):
    """The run's preference splits ({prompt, chosen, rejected} rows, or pairs from a MIND folder),
    with its reward settings checked: everything that can be wrong before a model loads."""
    from mlxft.data.dataset import load_preference_splits

    check_reward_run(config)
    config.reward.check()
    return load_preference_splits(config.data)


def describe_reward(policy_line: str, hidden_size: int, rc) -> str:
    return (f"{policy_line}, of which {hidden_size:,} the reward head; Bradley-Terry loss"
            + (f", centred ({rc.center_coefficient:g})" if rc.center_coefficient else ""))


def evaluate_pairs(backend, model: str, adapter: str, source, *, template: str = "auto", batch_size: int = 32,
                   trust_remote_code: bool = False, lengths=None) -> dict:
    """`mlxft eval reward`: a saved reward model on a file of {prompt, chosen, rejected} rows (or a
    MIND folder's pairs). {'pairs', 'loss', 'accuracy', 'margin', 'rewards/chosen', 'rewards/rejected',
    'scores': [[chosen, rejected], ...] in file order}. `backend`: 'mlx' or 'torch'."""
    from pathlib import Path

    from mlxft.config import RewardConfig
    from mlxft.data.batching import iterate_pair_batches
    from mlxft.data.dataset import mind_preference_records, preference_records, resolve_source
    from mlxft.data.encode import encode_preference_records
    from mlxft.data.records import load_records
    from mlxft.data.templates import resolve_preference_template
    from mlxft.models.files import pad_id as pad_id_of

    path = resolve_source(str(source))
    if Path(path).is_dir() and (Path(path) / "behaviors.tsv").exists():
        records = mind_preference_records(path)
    else:
        records = preference_records(load_records(path), None)
    tokenizer, score = engine_for(backend).load_scorer(model, adapter, trust_remote_code=trust_remote_code)
    rc = lengths or RewardConfig()
    pairs, _ = encode_preference_records(records, resolve_preference_template(template, records, tokenizer), tokenizer,
                                         max_length=rc.max_length, max_prompt_length=rc.max_prompt_length,
                                         truncation_mode=rc.truncation_mode)
    pad_id = pad_id_of(tokenizer)
    scores = np.zeros((len(pairs), 2), np.float64)
    for batch in iterate_pair_batches(pairs, batch_size, pad_id, shuffle=False):
        values = score(batch.batch.input_ids)
        scores[batch.index, 0], scores[batch.index, 1] = values[: batch.pairs], values[batch.pairs:]
    sums = reward_objective(scores.reshape(-1, order="F"), 0.0, xp=np, detach=lambda x: x)[1]
    return {"pairs": len(pairs), **summarize(sums), "scores": scores.round(6).tolist()}
