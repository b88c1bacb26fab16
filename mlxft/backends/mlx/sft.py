"""Supervised fine-tuning (LoRA or full) on MLX. Reads top to bottom: setup -> model -> data ->
optimizer -> loop -> save.

    mlxft lora --recipe tallrec                 # the built-in model on the bundled MIND sample
    mlxft lora --recipe tallrec --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --data MINDsmall_train

Supports: LoRA in PEFT terms or full fine-tuning; quantized bases (QLoRA); AdamW with warmup and
cosine / linear / constant decay; gradient accumulation weighted by scored tokens (k micro-batches
give exactly the gradient of one batch k times the size); gradient clipping; steps or epochs;
length-grouped batches or packed rows (data.packing,
each example attending only to itself); the LM head run on scored positions only; a compiled step; gradient
checkpointing; validation loss (and AUC for Yes/No data) every N steps with the best adapter kept
and early stopping; atomic checkpoints every N steps and --resume that reproduces the losses of an
uninterrupted run; metrics.jsonl, summary.json and a progress bar with loss and tokens/s.

Raises UserError for bad recipes, data, models and adapters (see mlxft.errors).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.optimizers as optim

from mlxft import backends, driver
from mlxft.backends.mlx import PAD_MULTIPLE, checkpoint, lora, steps
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx.evaluate import evaluate
from mlxft.backends.mlx.generate import generate_answer
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_batches
from mlxft.data.dataset import load_splits
from mlxft.distributed import World
from mlxft.model_files import pad_id as pad_id_of
from mlxft.policy import build_policy, describe_policy
from mlxft.runs import Run
from mlxft.saved_check import check_saved_adapter, probe_ids
from mlxft.sft_common import answer_held_out, answer_ids_for, encode_sft_data, packed_train_set, sft_validation, token_mean_loss


def train(config: RunConfig, run: Run, *, resume: bool = False, adapter: str | None = None, echo=print,
          world: World = World()) -> dict:
    """Train as `config` says, writing into `run`; returns the summary (also in summary.json), or {}
    on a rank other than 0 of several (mlxft.distributed)."""
    tc, ec = config.train, config.eval
    backend = backends.get("mlx")

    # --- setup -----------------------------------------------------------------------------
    mx.random.seed(tc.seed)
    mlx_model.configure_memory()
    splits = load_splits(config.data)  # rows first: a data mistake should not wait for a model to load

    # --- model -----------------------------------------------------------------------------
    model, tokenizer, folder = mlx_model.load(config.model.name, quantize=config.model.quantize,
                                              trust_remote_code=config.model.trust_remote_code)
    split_head = mlx_model.can_split_head(model, folder)
    spec = build_policy(backend, model, config, folder, start_from=run.checkpoint_dir / "weights" if resume else adapter)
    trainable, line = describe_policy(backend, model, folder, spec, config)
    echo(line)

    # --- data ------------------------------------------------------------------------------
    train_set, valid_set, report = encode_sft_data(splits, tokenizer, config, echo)
    echo(f"run folder: {run.folder}")
    pad_id = pad_id_of(tokenizer)
    answer_ids = answer_ids_for(tokenizer, splits, ec.answers)
    examples = len(train_set)
    train_set = packed_train_set(train_set, config, mlx_model.can_pack(model, folder), folder, PAD_MULTIPLE, echo)

    # --- optimizer and step ----------------------------------------------------------------------
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
                            bias_correction=tc.bias_correction)
    start = driver.Start()
    if resume:  # before the step is compiled: it must capture the restored optimizer state
        start = driver.Start(*checkpoint.load(run, model, optimizer, config.lora.full_finetune))
    loss, inputs_of = ((partial(steps.packed_sft_loss, chunk=tc.head_chunk), steps.packed_sft_inputs) if config.data.packing
                       else (partial(steps.sft_loss, split_head=split_head, chunk=tc.head_chunk), steps.sft_inputs))
    micro_step, update = steps.make_step(model, optimizer, loss, tc.max_grad_norm)

    trainer = driver.Trainer(
        step=steps.train_step(model, optimizer, micro_step, update, inputs_of, tc.seed, world),
        validate=sft_validation(evaluate, model, valid_set, pad_id=pad_id, split_head=split_head,
                                batch_size=ec.batch_size, answer_ids=answer_ids, world=world),
        summarize=token_mean_loss,
        save_weights=lambda where: checkpoint.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: checkpoint.save(run, model, optimizer, spec, config, folder, *state),
        memory=mlx_model.memory_meter(),
    )

    # --- loop ----------------------------------------------------------------------------------
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_batches, pad_id=pad_id,
                        pad_multiple=PAD_MULTIPLE, world=world, echo=echo)
    if not world.main:
        return {}

    # --- save ----------------------------------------------------------------------------------
    saved_check = None if config.lora.full_finetune else check_saved_adapter(
        lora, model, run.folder / "last", probe_ids(valid_set or train_set), echo)
    generations = answer_held_out(generate_answer, model, tokenizer, splits, config) if ec.generate_examples else []
    return driver.summarize_run(run, config, fitted, trainer, method="sft", backend="mlx", device=str(mx.default_device()),
                                model=str(folder), trainable=trainable,
                                data={"train_rows": examples, "truncated_rows": report.truncated,
                                      **({"packed_rows": len(train_set)} if config.data.packing else {})},
                                outputs={"saved_check": saved_check, "generations": generations})
