"""One benchmark workload, built once and handed to every backend: the resolved run config, the
batches of every step (warm-up first), and the adapter every backend starts from.

The batches come from the trainers' own batch stream (length-grouped), so padding is what a real
run would pay. They are tokenized once, here, and saved as numpy arrays padded to their longest
row; each backend then widens them as its trainer does (its PAD_MULTIPLE, or the bench's
--pad-multiple for all), so both backends train on the very same ids. The starting adapter is
drawn here too (A uniform within ±1/sqrt(in), B zero: the initialisation both backends use), so
the same weights and batches must give the same losses, step after step, up to float error: the
proof that the backends did the same work.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mlxft.config import RunConfig, dump_config, load_config
from mlxft.data.batching import Batch, iterate_pair_batches, widen
from mlxft.errors import UserError
from mlxft.models.adapters import AdapterSpec, layer_index, resolve_targets
from mlxft.train.driver import batch_stream

RECIPES = {"lora": "tallrec", "dpo": "dpo"}
LLAMA_BLOCK = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# Bench defaults, before the user's --set (which wins): the workload is LoRA even on the built-in
# model (whose recipes train it fully), and without dropout, whose random masks differ between
# backends and would hide whether the losses agree.
BENCH_SETTINGS = ("lora.full_finetune=false", "lora.dropout=0.0")


@dataclass
class Workload:
    name: str  # lora or dpo
    config: RunConfig
    model_dir: Path
    steps: list[list[Batch]]  # per optimizer step, its micro-batches (pair batches: 2B rows, chosen first)
    warmup: int
    encoded_rows: int
    truncated_rows: int
    pad_id: int = 0
    pad_multiple: int | None = None  # None: each backend's own PAD_MULTIPLE

    def for_backend(self, backend: str) -> Workload:
        """The same rows, padded as `backend`'s trainer pads them (or to the bench's pad_multiple)."""
        multiple = self.pad_multiple or backend_pad_multiple(backend)
        steps = [[widen(batch, self.pad_id, multiple) for batch in micro] for micro in self.steps]
        return replace(self, steps=steps)

    @property
    def spec(self) -> AdapterSpec:
        """The adapter both sides train; a target preset is resolved on the Llama-family block layout
        that the bench's models have (before either backend loads them)."""
        lc = self.config.lora
        layout = {f"model.layers.0.{part}.{name}": (0, 0) for part, names in LLAMA_BLOCK.items() for name in names}
        return AdapterSpec(lc.r, lc.alpha, lc.dropout, resolve_targets(lc.target_modules, layout), str(self.model_dir),
                           lc.layers, use_rslora=lc.use_rslora, use_dora=lc.use_dora)

    @property
    def model_config(self) -> dict:
        return json.loads((self.model_dir / "config.json").read_text())


def backend_pad_multiple(backend: str) -> int:
    return _backend(backend).PAD_MULTIPLE


def backend_shared_prompt_padding(backend: str) -> tuple[int, bool]:
    """(multiple, few_widths) of a backend's DPO shared-prompt layout."""
    package = _backend(backend)
    return package.SHARED_PROMPT_PAD_MULTIPLE, package.SHARED_PROMPT_FEW_WIDTHS


def _backend(backend: str):
    """mlxft.backends.mlx or .torch: their packages hold only constants, so reading them imports
    neither framework."""
    from mlxft.backends import mlx, torch

    return mlx if backend == "mlx" else torch


def resolve_config(workload: str, model: str | None, overrides: list[str], batch_size: int | None,
                   seq_len: int | None) -> RunConfig:
    """The workload's recipe with the bench defaults, the flags and --set applied (in that order)."""
    if workload not in RECIPES:
        raise UserError(f"unknown workload '{workload}'; use one of {', '.join(RECIPES)}")
    settings = list(BENCH_SETTINGS)
    if model:
        settings.append(f"model.name={model}")
    if batch_size:
        settings.append(f"train.batch_size={batch_size}")
    if seq_len:
        settings.append(f"{'dpo.max_length' if workload == 'dpo' else 'data.cutoff'}={seq_len}")
    config = load_config(RECIPES[workload], settings + list(overrides))
    if config.lora.full_finetune:
        raise UserError("the bench times LoRA steps; lora.full_finetune=true is not benchmarked")
    if config.train.grad_checkpoint:
        raise UserError("the bench does not time gradient checkpointing (train.grad_checkpoint=true) yet")
    if config.data.packing:
        raise UserError("the bench times unpacked rows; data.packing is not benchmarked (benchmarks/packing.py times it)")
    if workload == "dpo":
        config.dpo.check()
        if config.dpo.precompute_reference or config.dpo.reference_adapter:
            raise UserError("the dpo workload times the reference forward in every step (the adapter switched off); "
                            "drop dpo.precompute_reference / dpo.reference_adapter")
    return config


def build(workload: str, config: RunConfig, *, steps: int, warmup: int, pad_multiple: int | None = None) -> Workload:
    """Rows -> ids -> the batches of warmup + steps optimizer steps, as the trainers make them,
    padded to their longest row (pad_multiple: what every backend widens them to instead of its
    own PAD_MULTIPLE, to measure another padding policy)."""
    from mlxft.models.files import load_tokenizer, pad_id, resolve_model_dir

    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be at least 1 and --warmup at least 0 (got {steps} and {warmup})")
    model_dir = resolve_model_dir(config.model.name)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=config.model.trust_remote_code)
    if workload == "dpo":
        from mlxft.data.dataset import encode_preference_split, load_preference_splits

        splits = load_preference_splits(config.data, config.dpo.support_ratio)
        examples, report = encode_preference_split(splits.train, splits, tokenizer, config.data, config.dpo)
        iterate = iterate_pair_batches
    else:
        from mlxft.data.batching import iterate_batches
        from mlxft.data.dataset import encode_split, load_splits

        splits = load_splits(config.data)
        examples, report = encode_split(splits.train, splits, tokenizer, config.data)
        iterate = iterate_batches
    if not examples:
        why = f" ({report.dropped} rows lost their answer to the length cutoff: raise --seq-len)" if report.dropped else ""
        raise UserError(f"data {splits.source}: no training rows to benchmark on{why}")
    stream = batch_stream(examples, config.train, pad_id(tokenizer), skip=0, iterate=iterate, pad_to_multiple=1)
    batches = [[_plain(next(stream)[0]) for _ in range(config.train.grad_accumulation)] for _ in range(warmup + steps)]
    return Workload(workload, config, model_dir, batches, warmup, report.kept, report.truncated, pad_id(tokenizer),
                    pad_multiple)


def _plain(batch) -> Batch:
    return batch.batch if hasattr(batch, "batch") else batch  # a PairBatch's rows, chosen first


def initial_adapter(paths: dict[str, tuple[int, int]], r: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module path: (A [r, in], B [out, r])} for the adapted modules {path: (out, in)}, drawn in
    the modules' order from `seed`: the starting point of every backend."""
    rng = np.random.default_rng(seed)
    weights = {}
    for path in sorted(paths, key=lambda p: (layer_index(p), p)):
        out_dim, in_dim = paths[path]
        bound = 1 / np.sqrt(in_dim)
        weights[path] = (rng.uniform(-bound, bound, (r, in_dim)).astype(np.float32), np.zeros((out_dim, r), np.float32))
    return weights


def distinct_shapes(workload: Workload, inputs_of) -> list:
    """The step inputs (inputs_of(batch): a tuple or a dict of arrays) of one batch per distinct
    set of input shapes in the run: what a compiled step is traced for."""
    seen = {}
    for micro in workload.steps:
        for batch in micro:
            inputs = inputs_of(batch)
            shapes = tuple(tuple(a.shape) for a in (inputs.values() if isinstance(inputs, dict) else inputs))
            seen.setdefault(shapes, inputs)
    return list(seen.values())


def shared_layout(workload: Workload, backend: str):
    """batch -> its shared-prompt layout as a backend's DPO trainer makes it (the bench's
    pad_multiple instead of the backend's, when given): what step_record counts."""
    from mlxft.data.shared_prompt import share_prompts

    multiple, few_widths = backend_shared_prompt_padding(backend)
    return lambda batch: share_prompts(batch, workload.pad_id, workload.pad_multiple or multiple, few_widths=few_widths)


def step_record(step: int, workload: Workload, micro_batches, seconds: float, loss: float, grad_norm: float,
                cpu_seconds: float, shared_layout=None, peak_memory_gb: float | None = None) -> dict:
    """What a step processed, counted from its batches (the same on every backend). `tokens`
    counts the rows as the peers run them, each pair's prompt with each answer: what tokens/s
    compares. With DPO's shared prompts (`shared_layout` lays a batch out) the model runs each
    prompt once: `computed_tokens` and `padded_tokens` count what it ran."""
    scored = sum(int(b.loss_mask[:, 1:].sum()) for b in micro_batches)
    tokens = sum(b.tokens for b in micro_batches)
    if shared_layout:
        layouts = [shared_layout(b) for b in micro_batches]
        computed, padded = sum(x.computed_tokens for x in layouts), sum(x.computed_positions for x in layouts)
    else:
        computed, padded = tokens, sum(int(b.input_ids.size) for b in micro_batches)
    return {
        "step": step + 1,
        "timed": step >= workload.warmup,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # all the process's threads: steadier than wall time on a shared host
        "loss": loss,
        "grad_norm": grad_norm,
        "peak_memory_gb": peak_memory_gb,  # the step's own (timed steps)
        "tokens": tokens,  # non-padding tokens
        "supervised_tokens": scored,  # tokens that carry loss
        "computed_tokens": computed,
        "padded_tokens": padded,
        "rows": sum(len(b.lengths) for b in micro_batches),
    }


# --- handing a workload to a child process ---------------------------------------------------------

def save(workload: Workload, folder: Path) -> Path:
    """config.yaml + batches.npz + workload.json in `folder`; returns workload.json's path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = workload.config
    config.model.name = str(workload.model_dir)  # the folder itself: a child never rebuilds the built-in model
    config.builtin_model = {}  # already applied; re-applying would undo the bench's own settings
    (folder / "config.yaml").write_text(dump_config(config))
    arrays = {}
    for s, micro in enumerate(workload.steps):
        for m, batch in enumerate(micro):
            for field in ("input_ids", "loss_mask", "lengths"):
                arrays[f"{s}.{m}.{field}"] = getattr(batch, field)
    np.savez(folder / "batches.npz", **arrays)
    meta = {"workload": workload.name, "model_dir": str(workload.model_dir), "warmup": workload.warmup,
            "steps": len(workload.steps), "micro_batches": config.train.grad_accumulation,
            "encoded_rows": workload.encoded_rows, "truncated_rows": workload.truncated_rows,
            "pad_id": workload.pad_id, "pad_multiple": workload.pad_multiple,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / "workload.json").write_text(json.dumps(meta, indent=2))
    return folder / "workload.json"


def load(path: Path) -> Workload:
    path = Path(path)
    meta = json.loads(path.read_text())
    config = load_config(str(path.parent / "config.yaml"))
    arrays = np.load(path.parent / "batches.npz")
    steps = [[Batch(*(arrays[f"{s}.{m}.{field}"] for field in ("input_ids", "loss_mask", "lengths")))
              for m in range(meta["micro_batches"])] for s in range(meta["steps"])]
    return Workload(meta["workload"], config, Path(meta["model_dir"]), steps, meta["warmup"], meta["encoded_rows"],
                    meta["truncated_rows"], meta["pad_id"], meta["pad_multiple"])
