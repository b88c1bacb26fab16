"""Direct preference optimisation (DPO) and its relatives, on either backend, with the reference
model for free. Reads top to bottom: setup -> reference -> policy -> data -> optimizer -> loop ->
save -> before/after answers.

    mlxft dpo --recipe dpo                                       # built-in model, bundled preference sample
    mlxft dpo --recipe dpo --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --data pairs.jsonl
    mlxft dpo --recipe dpo --adapter runs/sft/best               # continue an SFT adapter; it is the reference
    mlxft dpo --recipe dpo --backend torch --model Qwen/Qwen2.5-0.5B-Instruct
    mlxft dpo --recipe dpo --data data/opposing-sample.json --set dpo.support_ratio=0.5 \
        --set dpo.compare_prompts=data/opposing-test.json

The reference model is never a second copy of the weights:
- a new adapter: the reference is the base model, i.e. this very model with its LoRA layers
  switched off for one forward (`lora.adapter_off`: each layer's scale 0 and dropout off; PEFT's
  `disable_adapter()`), without gradient. How each backend runs it without keeping its
  activations is the engine's (mlxft.backends.mlx.engine, mlxft.backends.torch.engine);
- `dpo.precompute_reference`: the same log-probs, once for the train and validation pairs
  before training, cached in the run folder (reference_logps.safetensors, reused on --resume):
  no reference forward per step;
- `--adapter DIR` (continue an SFT adapter), `dpo.reference_adapter`, or full fine-tuning: the
  reference is base + that adapter (or the initial weights). The trained weights sit where the
  reference's are, so there is nothing to switch off: the reference is always precomputed.

One forward per step runs chosen and rejected together, and each prompt once: one [prompt |
chosen | rejected] row per pair, the rejected answer at the chosen one's positions and masked from
it (mlxft.data.shared_prompt; `dpo.share_prompt`, on by default: the same loss with ~30% fewer
tokens on the bundled pairs). Model families it does not know, attention that takes no custom
mask, and gradient checkpointing on MLX run the 2B rows [prompt + chosen; prompt + rejected]
instead. Only answer tokens are scored, through the LM head at those positions.

Supports: sigmoid (with label smoothing), IPO, hinge, robust, KTO, ORPO and SimPO losses
(mlxft.losses.dpo); summed or averaged answer log-probs; LoRA (QLoRA on quantized bases) or full
fine-tuning; AdamW with warmup and cosine / linear / constant decay; gradient accumulation
weighted by pairs (k micro-batches give exactly the gradient of one batch k times the size);
clipping; steps or epochs; validation every N steps with the best adapter kept and early
stopping; atomic checkpoints and --resume that reproduces an uninterrupted run's losses;
metrics.jsonl with TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/*, logits/*; eval_ for validation); summary.json; a progress bar; and
answers of the model before and after training, side by side (comparison.json, comparison.md).

Raises UserError for bad recipes, data, models and adapters (see mlxft.errors), for --quantize on
PyTorch without CUDA, and for resuming a run another backend wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mlxft.backends import engine_for
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_pair_batches
from mlxft.data.dataset import encode_preference_split
from mlxft.data.templates import describe_template
from mlxft.errors import UserError
from mlxft.files import write_atomic
from mlxft.losses.dpo import statistic_names, summarizer
from mlxft.models.adapters import attach_adapter
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
    tc, ec, dc = config.train, config.eval, config.dpo
    engine = engine_for(backend)

    # --- setup -----------------------------------------------------------------------------
    engine.start(tc.seed)
    splits, asked = load_pair_data(config, adapter)  # rows first: a data mistake should not wait for a model

    model, tokenizer, folder = engine.load(config.model)
    split_head = engine.can_split_head(model, folder)
    pad_id = pad_id_of(tokenizer)
    shared = dc.share_prompt and engine.can_share_prompts(model, folder, tc)
    train_set, valid_set, truncated_pairs = encode_pairs(splits, tokenizer, config, echo)

    # --- reference ---------------------------------------------------------------------------
    cache, reference_name = prepare_reference(
        run, config, adapter=adapter, model_folder=folder, train_set=train_set, valid_set=valid_set, resume=resume,
        score=lambda pairs: engine.score_pairs(model, pairs, pad_id=pad_id, split_head=split_head, shared=shared,
                                               batch_size=ec.batch_size),
        carry_adapter=lambda path: attach_adapter(engine.lora, model, path),
        drop_adapter=lambda: engine.lora.remove_lora(model), echo=echo, write=world.main)

    # --- policy ----------------------------------------------------------------------------
    engine.seed(tc.seed)  # a new adapter's A is the same whether or not the reference was scored first
    spec = build_policy(engine, model, config, folder, start_from=run.checkpoint_dir / "weights" if resume else adapter)
    trainable, line = describe_policy(engine, model, folder, spec, config, where=engine.where)
    echo(describe_dpo(line, dc, reference_name, shared))
    echo(f"run folder: {run.folder}")

    # --- optimizer and step ----------------------------------------------------------------------
    optimizer = engine.optimizer(model, tc)
    start = engine.resume(run, model, optimizer, config) if resume else driver.Start()  # before the step is built

    def cached(pairs, split: str, rows=None) -> np.ndarray:
        """Cached reference log-prob sums [2B] of a pair batch, in its row order (chosen, then
        rejected); `rows` maps its pairs' indices to the split's."""
        return cached_reference(cache, split, pairs.index if rows is None else rows[pairs.index])

    labels = {"train": pair_labels(splits.train), "valid": pair_labels(splits.valid)}  # KTO's; 1 for every pair
    step = engine.pair_step(model, optimizer, config, split_head=split_head, shared=shared, pad_id=pad_id,
                            reference=cached if cache is not None else None, labels=labels, world=world)
    statistics, summarize = len(statistic_names(dc.loss_type)), summarizer(dc.loss_type)
    trainer = driver.Trainer(
        step=step.step,
        validate=driver.pair_validation(model, valid_set, step.validation_sums, summarize, statistics=statistics,
                                        batch_size=ec.batch_size, pad_id=pad_id, pad_multiple=engine.pad_multiple,
                                        world=world),
        summarize=summarize,
        save_weights=lambda where: engine.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: engine.save_checkpoint(run, model, optimizer, spec, config, folder, *state),
        memory=engine.memory_meter(),
    )

    # --- loop ----------------------------------------------------------------------------------
    prompts = compare_rows(asked, splits, ec)
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_pair_batches, pad_id=pad_id,
                        pad_multiple=engine.pad_multiple, echo=echo,
                        baseline=lambda: {"before_answers": answer_all(engine.generate_answer, model, tokenizer, prompts,
                                                                       splits, config)},
                        world=world)
    if not world.main:
        return {}

    # --- save ----------------------------------------------------------------------------------
    saved_check = None if config.lora.full_finetune else check_saved_adapter(
        engine.lora, model, run.folder / "last", probe_ids(valid_set or train_set), echo)

    # --- before / after answers ----------------------------------------------------------------
    before_answers, comparison = compare_after(run, config, fitted, engine.generate_answer, model, tokenizer, prompts,
                                               splits, adapter)
    return driver.summarize_run(
        run, config, fitted, trainer, method="dpo", backend=engine.name, device=engine.device, model=str(folder),
        trainable=trainable, setup={"reference": reference_name, "loss_type": dc.loss_type, "beta": dc.beta},
        data={"train_pairs": len(train_set), "valid_pairs": len(valid_set), "truncated_pairs": truncated_pairs,
              "shared_prompts": shared},
        outputs={"saved_check": saved_check, "before_answers": before_answers, "comparison": comparison})


# --- the pieces of a run that are DPO's own: its pairs, its reference, its before/after answers -----

REFERENCE_FILE = "reference_logps.safetensors"


# --- data ----------------------------------------------------------------------------------------

def load_pair_data(config, adapter: str | None):
    """(preference splits, the prompts asked before and after training or None), with the run's DPO
    settings checked: everything that can be wrong before a model loads."""
    from mlxft.data.dataset import load_preference_splits, prompt_records, resolve_source
    from mlxft.data.records import load_records
    from mlxft.models.adapters import load_adapter

    dc = config.dpo
    dc.check()
    splits = load_preference_splits(config.data, dc.support_ratio, unpaired=dc.loss_type == "kto")
    asked = prompt_records(load_records(resolve_source(dc.compare_prompts))) if dc.compare_prompts else None
    if adapter and config.lora.full_finetune:
        raise UserError("--adapter continues a LoRA adapter; drop it, or lora.full_finetune")
    if dc.reference_adapter:
        load_adapter(dc.reference_adapter)  # a bad path fails now, not after the data is encoded
    return splits, asked


def pair_labels(records) -> np.ndarray:
    """Per row, 1.0 for a desirable answer (KTO's `label`; every pair's chosen answer is)."""
    return np.array([float(r.get("label", True)) for r in records], dtype=np.float32)


def describe_dpo(policy_line: str, dc, reference_name: str, shared: bool) -> str:
    return (f"{policy_line}; DPO {dc.loss_type}, beta {dc.beta:g}; reference: {reference_name}"
            f"; {'each prompt run once' if shared else 'prompts run with each answer'}")


# --- the reference ---------------------------------------------------------------------------------

def encode_pairs(splits, tokenizer, config, echo, lengths=None) -> tuple[list, list, int]:
    """(train pairs, validation pairs, truncated pairs) encoded with the lengths of the DPO section
    (or `lengths`: the reward section), with the data line printed."""
    dc = lengths or config.dpo
    train_set, report = encode_preference_split(splits.train, splits, tokenizer, config.data, dc)
    valid_set, valid_report = (encode_preference_split(splits.valid, splits, tokenizer, config.data, dc)
                               if splits.valid else ([], None))
    echo(f"data {splits.source}: {len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test pairs; "
         f"template {describe_template(splits.template, tokenizer)}; {report.summary()}"
         + (f"; validation: {valid_report.truncated} truncated" if valid_report and valid_report.truncated else ""))
    return train_set, valid_set, report.truncated + (valid_report.truncated if valid_report else 0)


def prepare_reference(run, config, *, adapter: str | None, model_folder, train_set, valid_set, resume: bool,
                      score, carry_adapter, drop_adapter, echo, write: bool = True) -> tuple[dict | None, str]:
    """(the reference log-probs of every train and validation pair, or None when the reference
    runs in each step as the model with its adapter switched off; the reference's name). Runs
    before the policy is built, with the backend's pieces:
    - a resumed run with a cache reads it back (checked against the model and every token id);
    - a precomputed reference is scored once, `score(pairs) -> (chosen, rejected)`, with the
      reference adapter on for that time (`carry_adapter(path)`, `drop_adapter()`), and saved
      in the run folder (REFERENCE_FILE, written atomically; by rank 0 alone: `write`)."""
    from mlxft.losses.dpo import needs_reference, uses_mean_logps

    dc = config.dpo
    if not needs_reference(dc.loss_type):
        return None, f"none ({dc.loss_type} needs no reference model)"
    reference_from, precompute = reference_source(dc, adapter, config.lora.full_finetune)
    cache_path = run.folder / REFERENCE_FILE
    fingerprint = cache_fingerprint(model_folder, train_set, valid_set, uses_mean_logps(dc.loss_type, dc.average_log_prob))
    if resume and cache_path.exists():
        return load_reference(cache_path, fingerprint)
    if not precompute:
        return None, "base model (adapter off)"
    if resume:
        raise UserError(f"--resume {run.folder}: the run's cached reference log-probs ({REFERENCE_FILE}) are missing")
    if reference_from:  # base + that adapter, for as long as it takes to score the pairs once
        carry_adapter(reference_from)
    name = reference_label(reference_from)
    echo(f"reference: {name}; scoring {len(train_set) + len(valid_set)} pairs once")
    cache = {f"{split}_{side}": values for split, pairs in (("train", train_set), ("valid", valid_set))
             for side, values in zip(("chosen", "rejected"), score(pairs))}
    if write:
        save_reference(cache_path, cache, fingerprint, name)
    drop_adapter()
    return cache, name


def reference_source(dc, adapter: str | None, full_finetune: bool) -> tuple[str | None, bool]:
    """(the adapter the reference carries, or None for the base model; whether its log-probs
    are precomputed). When the trained weights sit where the reference's are (a continued
    adapter, a reference adapter, full fine-tuning) there is nothing to switch off, so the
    reference is always precomputed; a new adapter's reference is the model with it switched off."""
    reference_from = dc.reference_adapter or adapter
    return reference_from, dc.precompute_reference or reference_from is not None or full_finetune


def reference_label(reference_from: str | None) -> str:
    return f"base model + adapter {reference_from}" if reference_from else "base model"


def cache_fingerprint(model_folder, train_set, valid_set, mean_logps: bool) -> str:
    """What the cached log-probs depend on besides the reference: the model and every token id."""
    digest = hashlib.sha256(f"{Path(model_folder).resolve()}|{mean_logps}".encode())
    for pair in list(train_set) + list(valid_set):
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return digest.hexdigest()[:16]


def save_reference(path: Path, cache: dict, fingerprint: str, reference_name: str) -> None:
    """{'train_chosen': [N] float32, ...} as safetensors, written under a temporary name and renamed."""
    from safetensors.numpy import save_file

    staging = path.with_name(f".{path.stem}.tmp.safetensors")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in cache.items()}, str(staging),
              metadata={"fingerprint": fingerprint, "reference": reference_name})
    os.replace(staging, path)


def load_reference(path: Path, fingerprint: str) -> tuple[dict, str]:
    """(the cached log-probs, the reference's name); a UserError when they belong to another run."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata() or {}
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("fingerprint") != fingerprint:
        raise UserError(f"{path}: the cached reference log-probs were computed for other data or another model; "
                        "start a new run instead of resuming this one")
    return arrays, metadata.get("reference", "cached")


def cached_reference(cache: dict, split: str, index: np.ndarray) -> np.ndarray:
    """Reference log-prob sums [2B] of a pair batch from the cache, in its row order (chosen, then rejected)."""
    return np.concatenate([cache[f"{split}_chosen"][index], cache[f"{split}_rejected"][index]])


# --- before / after answers ------------------------------------------------------------------------

def compare_rows(asked, splits, ec) -> list:
    """The prompts answered before and after: dpo.compare_prompts, else held-out pairs."""
    return asked if asked is not None else (splits.test or splits.valid)[: ec.generate_examples]


def answer_all(generate_answer, model, tokenizer, rows, splits, config) -> list[str]:
    """The model's greedy answers to `rows`' prompts, through a backend's generate_answer."""
    from mlxft.data.templates import preference_prompt

    return [generate_answer(model, tokenizer, preference_prompt(row, splits.template, tokenizer,
                                                                system_prompt=config.data.system_prompt),
                            max_tokens=config.eval.max_new_tokens)
            for row in rows]


def compare_after(run, config, fitted, generate_answer, model, tokenizer, prompts, splits, adapter) -> tuple[list, dict | None]:
    """(the answers before training, the comparison files written) once a run has trained: the
    trained model answers the same prompts as before (fitted.baseline's before_answers)."""
    before_answers = fitted.baseline.get("before_answers", [])
    if not prompts:
        return before_answers, None
    after_answers = answer_all(generate_answer, model, tokenizer, prompts, splits, config)
    return before_answers, write_comparison(run.folder, prompts, before_answers, after_answers, config, adapter, fitted.steps)


def write_comparison(folder: Path, rows, before: list[str], after: list[str], config, adapter, steps: int) -> dict:
    """comparison.json and comparison.md: each held-out prompt with the answers before and after."""
    starting_point = (f"adapter {adapter}" if adapter else "base model" if config.lora.full_finetune
                      else "base model, adapter off")
    items = []
    for row, old, new in zip(rows, before, after):
        item = {"origin": row.origin, "prompt": _prompt_text(row["prompt"]), "before": old, "after": new}
        for field in ("chosen", "rejected"):
            if isinstance(row.get(field), str):
                item[field] = row[field]
        items.append(item)
    header = (f"# Before and after DPO\n\n{config.recipe}: {steps} steps of DPO ({config.dpo.loss_type}, beta "
              f"{config.dpo.beta:g}) on {config.model.name}. Before: {starting_point}. After: the last adapter. "
              f"Greedy decoding, at most {config.eval.max_new_tokens} new tokens.\n")
    sections = []
    for i, item in enumerate(items, start=1):
        text = (f"## {i}. {_cell(item['prompt'])}\n\n<sub>{item['origin']}</sub>\n\n"
                f"| before ({starting_point}) | after DPO |\n| --- | --- |\n| {_cell(item['before'])} | {_cell(item['after'])} |\n")
        if "chosen" in item:
            text += f"\nIn the data: preferred *{_cell(item['chosen'])}*, rejected *{_cell(item['rejected'])}*\n"
        sections.append(text)
    empty = {when: sum(not item[when].strip() for item in items) for when in ("before", "after")}
    if any(empty.values()):
        # An instruct model given a prompt outside its chat template often ends its turn at once.
        header += (f"\n**Empty answers: {empty['before']} of {len(items)} before, {empty['after']} after.** A model that "
                   f"answers nothing is often reading prompts outside its chat template (data.template: "
                   f"{config.data.template}).\n")
    write_atomic(folder / "comparison.json", json.dumps({"before": starting_point, "after": "last adapter", "items": items,
                                                         "empty_answers": empty}, indent=2))
    write_atomic(folder / "comparison.md", header + "\n" + "\n".join(sections))
    return {"json": str(folder / "comparison.json"), "markdown": str(folder / "comparison.md"), "prompts": len(items),
            "empty_answers": empty}


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else next((m["content"] for m in reversed(prompt) if m["role"] == "user"),
                                                      prompt[-1]["content"])


def _cell(text: str) -> str:
    return (text.strip() or "(empty)").replace("|", "\\|").replace("\n", "<br>")
