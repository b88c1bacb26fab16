"""Supervised fine-tuning (LoRA or full), on either backend. Reads top to bottom: setup -> model ->
data -> optimizer -> loop -> save.

    mlxft lora --recipe tallrec                 # the built-in model on the bundled MIND sample
    mlxft lora --recipe tallrec --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --data MINDsmall_train
    mlxft lora --recipe tallrec --backend torch --model Qwen/Qwen2.5-0.5B-Instruct

Supports: LoRA in PEFT terms or full fine-tuning; quantized bases (QLoRA: MLX's own quantization
on any device, bitsandbytes on CUDA); AdamW with warmup and cosine / linear / constant decay (on
PyTorch MLX's update, mlxft.backends.torch.adamw); gradient accumulation weighted by scored tokens
(k micro-batches give exactly the gradient of one batch k times the size); gradient clipping;
steps or epochs; length-grouped batches or packed rows (data.packing, each example attending only
to itself); the LM head run on scored positions only, in chunks (train.head_chunk); a compiled
step on MLX, bf16 autocast on CUDA; gradient checkpointing; validation loss (and AUC for Yes/No
data) every N steps with the best adapter kept and early stopping; atomic checkpoints every N
steps and --resume that reproduces the losses of an uninterrupted run; data parallelism
(mlxft.train.distributed); metrics.jsonl, summary.json and a progress bar with loss and tokens/s.

Raises UserError for bad recipes, data, models and adapters (see mlxft.errors), for --quantize on
PyTorch without CUDA, and for resuming a run another backend wrote.
"""

from __future__ import annotations

from mlxft.backends import engine_for
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_batches
from mlxft.data.dataset import load_splits
from mlxft.data.encode import answer_token_ids
from mlxft.errors import UserError
from mlxft.models.files import SPLIT_HEAD_TYPES, model_type
from mlxft.models.files import pad_id as pad_id_of
from mlxft.train import driver
from mlxft.train.distributed import World
from mlxft.train.policy import build_policy, describe_policy
from mlxft.train.runs import Run
from mlxft.train.saved_check import check_saved_adapter, probe_ids


def train(config: RunConfig, run: Run, *, backend: str = "mlx", resume: bool = False, adapter: str | None = None,
          echo=print, world: World = World()) -> dict:
    """Train as `config` says on `backend` ('mlx' or 'torch'), writing into `run`; returns the
    summary (also in summary.json), or {} on a rank other than 0 of several (mlxft.train.distributed)."""
    tc, ec = config.train, config.eval
    engine = engine_for(backend)

    # --- setup -----------------------------------------------------------------------------
    engine.start(tc.seed)
    splits = load_splits(config.data)  # rows first: a data mistake should not wait for a model to load

    # --- model -----------------------------------------------------------------------------
    model, tokenizer, folder = engine.load(config.model)
    split_head = engine.can_split_head(model, folder)
    spec = build_policy(engine, model, config, folder, start_from=run.checkpoint_dir / "weights" if resume else adapter)
    engine.distribute(model, config, world)  # train.fsdp: the weights split across the ranks
    trainable, line = describe_policy(engine, model, folder, spec, config, where=engine.where)
    echo(line + (f"; sharded across {world.size} ranks (FSDP)" if engine.sharded else ""))

    # --- data ------------------------------------------------------------------------------
    train_set, valid_set, report = encode_sft_data(splits, tokenizer, config, echo)
    echo(f"run folder: {run.folder}")
    pad_id = pad_id_of(tokenizer)
    answer_ids = answer_ids_for(tokenizer, splits, ec.answers)
    examples = len(train_set)
    train_set = packed_train_set(train_set, config, engine.can_pack(model, folder), folder, engine.pad_multiple, echo)

    # --- optimizer and step ----------------------------------------------------------------------
    optimizer = engine.optimizer(model, tc)
    start = engine.resume(run, model, optimizer, config) if resume else driver.Start()  # before the step is built
    trainer = driver.Trainer(
        step=engine.sft_step(model, optimizer, config, split_head=split_head, world=world).step,
        validate=sft_validation(engine.evaluate, model, valid_set, pad_id=pad_id, split_head=split_head,
                                batch_size=ec.batch_size, answer_ids=answer_ids, world=world),
        summarize=token_mean_loss,
        save_weights=lambda where: engine.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: engine.save_checkpoint(run, model, optimizer, spec, config, folder, *state),
        memory=engine.memory_meter(),
        saves_on_every_rank=engine.sharded,
    )

    # --- loop ----------------------------------------------------------------------------------
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_batches, pad_id=pad_id,
                        pad_multiple=engine.pad_multiple, world=world, echo=echo)
    if not world.main:
        return {}

    # --- save ----------------------------------------------------------------------------------
    saved_check = None if config.lora.full_finetune else check_saved_adapter(
        engine.lora, model, run.folder / "last", probe_ids(valid_set or train_set), echo)
    generations = answer_held_out(engine.generate_answer, model, tokenizer, splits, config) if ec.generate_examples else []
    return driver.summarize_run(run, config, fitted, trainer, method="sft", backend=engine.name, device=engine.device,
                                model=str(folder), trainable=trainable,
                                data={"train_rows": examples, "truncated_rows": report.truncated,
                                      **({"packed_rows": len(train_set)} if config.data.packing else {})},
                                outputs={"saved_check": saved_check, "generations": generations,
                                         **({"fsdp": {"ranks": world.size, **engine.shards(model, optimizer)}}
                                            if engine.sharded else {})})


# --- the pieces of a run that are SFT's own ---------------------------------------------------------


def answer_ids_for(tokenizer, splits, answers):
    """The Yes/No token ids when every validation answer is one of the recipe's answers."""
    if not answers or len(answers) != 2 or splits.schema != "alpaca" or not splits.valid:
        return None
    if any(r.get("output") not in answers for r in splits.valid):
        return None
    return answer_token_ids(tokenizer, answers)


def answer_held_out(generate_answer, model, tokenizer, splits, config) -> list[dict]:
    """Answers of the trained model to the first held-out rows (test split, else validation), each
    rendered with the run's template; `generate_answer(model, tokenizer, prompt, max_tokens=...)` is
    the backend's."""
    from mlxft.data.templates import render

    rows = (splits.test or splits.valid)[: config.eval.generate_examples]
    answers = []
    for record in rows:
        prompted = render(record, splits.schema, splits.template, tokenizer,
                          completion_field=config.data.completion_field, system_prompt=config.data.system_prompt)
        answer = generate_answer(model, tokenizer, prompted.prompt, max_tokens=config.eval.max_new_tokens)
        answers.append({"origin": record.origin, "prompt": prompted.prompt, "answer": answer,
                        "expected": prompted.completion})
    return answers


def token_mean_loss(sums) -> dict:
    """SFT's metrics from its step sums [scored tokens, loss sum]: the mean loss per scored token."""
    return {"loss": float(sums[1]) / float(sums[0])}


def encode_sft_data(splits, tokenizer, config, echo) -> tuple[list, list, object]:
    """(train examples, validation examples, the train split's EncodeReport), with the data line printed."""
    from mlxft.data.dataset import encode_split
    from mlxft.data.templates import describe_template

    train_set, report = encode_split(splits.train, splits, tokenizer, config.data)
    valid_set = encode_split(splits.valid, splits, tokenizer, config.data, for_eval=True)[0] if splits.valid else []
    echo(f"data {splits.source}: {len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test rows; "
         f"template {describe_template(splits.template, tokenizer)}; {report.summary()}")
    return train_set, valid_set, report


def packed_train_set(train_set: list, config, can_pack: bool, folder, pad_multiple: int, echo) -> list:
    """The training examples packed into rows of data.packing_length tokens (default data.cutoff)
    when data.packing is on (mlxft.data.packing), else as they are; validation is never packed (its
    loss is per example)."""
    from mlxft.data.packing import describe_packing, pack

    if not config.data.packing:
        return train_set
    if not can_pack:
        raise UserError(f"data.packing needs a model whose attention takes mlxft's mask of packed rows: a "
                        f"{', '.join(sorted(SPLIT_HEAD_TYPES))} model without sliding-window layers (on PyTorch with "
                        f"attention sdpa or eager); {folder} is {model_type(folder) or 'of no known model_type'}")
    width = config.data.packing_length or config.data.cutoff
    rows = pack(train_set, width)
    echo(describe_packing(train_set, rows, width, config.train.batch_size, pad_multiple))
    return rows


def sft_validation(evaluate, model, valid_set, *, pad_id: int, split_head: bool, batch_size: int, answer_ids, world):
    """validate() -> eval_* metrics of the model on the validation examples ({} without any), through
    a backend's evaluate."""

    def validate() -> dict:
        if not valid_set:
            return {}
        result = evaluate(model, valid_set, pad_id=pad_id, split_head=split_head, batch_size=batch_size,
                          answer_ids=answer_ids, world=world)
        result.pop("probabilities", None)
        return {f"eval_{k}": v for k, v in result.items()}

    return validate
