"""Reward models, on either backend: a LoRA adapter and a scalar head trained on preference pairs
with the Bradley-Terry loss (mlxft.reward), on the shared run driver. Reads top to bottom: setup
-> model -> data -> head -> optimizer -> loop -> save.

    mlxft reward --recipe reward                                  # built-in model, bundled preference sample
    mlxft reward --recipe reward --data data/mind-sample          # a clicked title preferred over a skipped one
    mlxft reward --recipe reward --model HuggingFaceTB/SmolLM2-135M-Instruct --data pairs.jsonl --backend torch
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

from mlxft import driver
from mlxft.backends import engine_for
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_pair_batches
from mlxft.distributed import World
from mlxft.errors import NotImplementedYet
from mlxft.methods.dpo import encode_pairs
from mlxft.model_files import SPLIT_HEAD_TYPES
from mlxft.model_files import pad_id as pad_id_of
from mlxft.policy import build_policy, describe_policy
from mlxft.reward import STATISTICS, describe_reward, load_instructions, load_reward_data, reward_spec, start_head, summarize
from mlxft.runs import Run


def train(config: RunConfig, run: Run, *, backend: str = "mlx", resume: bool = False, adapter: str | None = None,
          echo=print, world: World = World()) -> dict:
    """Train as `config` says on `backend` ('mlx' or 'torch'), writing into `run`; returns the
    summary (also in summary.json), or {} on a rank other than 0 of several (mlxft.distributed)."""
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
