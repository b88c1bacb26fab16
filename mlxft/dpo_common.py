"""The backend-neutral parts of a DPO run, shared by mlxft.backends.mlx.dpo and
mlxft.backends.torch.dpo: where the reference comes from, the cached reference log-probs
(reference_logps.safetensors: one file format, one check), and the before/after answers
(comparison.json, comparison.md). No mlx, no torch: numpy arrays and files only.

The loss math and the metric sums are in mlxft.dpo_loss; the loop is mlxft.driver's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mlxft.data.dataset import encode_preference_split
from mlxft.data.templates import describe_template
from mlxft.errors import UserError
from mlxft.files import write_atomic

REFERENCE_FILE = "reference_logps.safetensors"


# --- data ----------------------------------------------------------------------------------------

def load_pair_data(config, adapter: str | None):
    """(preference splits, the prompts asked before and after training or None), with the run's DPO
    settings checked: everything that can be wrong before a model loads."""
    from mlxft.adapters import load_adapter
    from mlxft.data.dataset import load_preference_splits, prompt_records, resolve_source
    from mlxft.data.records import load_records

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
    from mlxft.dpo_loss import needs_reference, uses_mean_logps

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
