"""`mlxft plan`: the memory a run needs, and the largest batch and cutoff that fit this machine.

    mlxft plan --recipe tallrec
    mlxft plan --recipe alpaca-sft --model HuggingFaceTB/SmolLM2-135M-Instruct --backend mlx --set lora.r=16

It runs the recipe's own training step (the trainers' step, in the processes `mlxft bench` uses)
on synthetic rows, every token but the first scored (the most a row can cost): one row at half of
data.cutoff, one at data.cutoff and two at data.cutoff, each step's peak on its own, after an
untimed first step. For DPO (`--for dpo`) a row is a pair at dpo.max_length (its prompt
dpo.max_prompt_length, at most half), and the step is DPO's: the reference forward, then the
policy's forward and backward on both answers; for a reward model (`--for reward`) a pair at
reward.max_length through the scalar head. Their peaks fit

    peak(rows, length) = fixed + rows * (a * length + b * length^2)

the weights, optimizer state and buffers, plus each row's activations (linear in its length, and
the attention scores' square). From the fit: the run's peak at train.batch_size x data.cutoff,
against train.memory_limit of the device's memory, and the largest batch and cutoff that fit.

Supports SFT (lora), DPO, reward and RL recipes with LoRA or QLoRA (packed SFT rows are measured
as plain rows of data.cutoff, without their block mask; for RL one training pass, PPO's value head
included, not the sampling before it), with or without gradient checkpointing; a run that does
not fit without it is measured again with it, and the plan says whether that would fit. Raises
NotImplementedYet for full fine-tuning and KTO, and UserError for a bad recipe or model, or a
backend that cannot run here.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.config import RunConfig
from mlxft.data.batching import Batch
from mlxft.errors import NotImplementedYet, UserError

SFT_RECIPES_METHOD = "lora"
# method: (its length setting, what a row is)
PLANNED = {"lora": ("data.cutoff", "rows"), "dpo": ("dpo.max_length", "pairs"), "reward": ("reward.max_length", "pairs"),
           "rl": ("rl.max_completion_length", "completions")}


@dataclass
class Fit:
    """peak(rows, length) = fixed + rows * (linear * length + square * length^2), in GB."""

    fixed: float
    linear: float
    square: float

    def peak(self, rows: int, length: int) -> float:
        return self.fixed + rows * self.per_row(length)

    def per_row(self, length: int) -> float:
        return self.linear * length + self.square * length ** 2

    def largest_batch(self, length: int, limit: float) -> int:
        room, row = limit - self.fixed, self.per_row(length)
        return max(int(room // row), 0) if row > 0 else 0

    def largest_length(self, rows: int, limit: float) -> int:
        """The longest rows of which `rows` fit in `limit` (a * L + b * L^2 = room / rows, solved for L)."""
        room = (limit - self.fixed) / rows
        if room <= 0:
            return 0
        if self.square <= 0:
            return int(room / self.linear) if self.linear > 0 else 0
        return int((-self.linear + math.sqrt(self.linear ** 2 + 4 * self.square * room)) / (2 * self.square))


def fit(one_full: float, two_full: float, one_half: float, length: int) -> Fit:
    """The fit through three peaks (GB): one row of `length` tokens, two such rows, one row of half."""
    half = length // 2
    per_row_full = max(two_full - one_full, 0.0)
    fixed = one_full - per_row_full
    per_row_half = max(one_half - fixed, 0.0)
    # a L + b L^2 = per_row_full and a H + b H^2 = per_row_half, for L = length and H = half
    square = (per_row_full * half - per_row_half * length) / (length ** 2 * half - half ** 2 * length)
    square = max(square, 0.0)  # a measured square below zero is noise: a line through the full-length rows
    linear = (per_row_full - square * length ** 2) / length
    return Fit(fixed, max(linear, 0.0), square)


def synthetic_batch(rows: int, length: int, vocab: int, seed: int) -> Batch:
    """`rows` rows of `length` random tokens, every token but the first scored."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, max(vocab, 4), size=(rows, length)).astype(np.int32)
    mask = np.ones((rows, length), dtype=bool)
    mask[:, 0] = False
    return Batch(ids, mask, np.full(rows, length, dtype=np.int32))


def synthetic_pairs(pairs: int, length: int, prompt_length: int, vocab: int, seed: int) -> Batch:
    """A pair batch's 2B rows (chosen first) of `length` random tokens: each pair's two rows share
    their first `prompt_length` tokens, and the answers after them are scored."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, max(vocab, 4), size=(2 * pairs, length)).astype(np.int32)
    ids[pairs:, :prompt_length] = ids[:pairs, :prompt_length]
    mask = np.zeros((2 * pairs, length), dtype=bool)
    mask[:, prompt_length:] = True
    return Batch(ids, mask, np.full(2 * pairs, length, dtype=np.int32))


def synthetic_rollout(rows: int, length: int, completion: int, vocab: int, seed: int) -> Batch:
    """`rows` rows of [prompt | completion], `length` random tokens, the last `completion` scored."""
    batch = synthetic_batch(rows, length, vocab, seed)
    batch.loss_mask[:, : length - completion] = False
    return batch


def prompt_length_of(config: RunConfig, method: str, length: int) -> int:
    return min(getattr(config, method).max_prompt_length or length // 2, length // 2)


def measure_peaks(config: RunConfig, model_dir: Path, backend: str, shapes: list[tuple[int, int]], vocab: int,
                  pad_id: int, folder: Path, threads: int, method: str = SFT_RECIPES_METHOD) -> list[float]:
    """The backend's peak memory (GB) of a training step at each (rows, length) of `shapes`, in
    one process (mlxft bench's child: the trainers' own step) after an untimed step at the first
    shape. Give the shapes smallest first: where the OS cannot reset a process's peak (torch on a
    Mac's CPU), each step's is then its own."""
    import copy

    from mlxft.bench import harness
    from mlxft.bench import workload as workloads

    config = copy.deepcopy(config)
    # One micro-batch a step: with k of them the peak is still one micro-batch's (plus the
    # gradients it adds to), and the bench's workload file holds exactly the batches given here.
    config.train.grad_accumulation = 1

    def batch(rows: int, length: int, seed: int) -> Batch:
        if method in ("dpo", "reward"):
            return synthetic_pairs(rows, length, prompt_length_of(config, method, length), vocab, seed)
        if method == "rl":  # the completion keeps its share of the row at every length measured
            full = (config.rl.max_prompt_length or 0) + config.rl.max_completion_length
            return synthetic_rollout(rows, length, max(1, config.rl.max_completion_length * length // full), vocab, seed)
        return synthetic_batch(rows, length, vocab, seed)

    steps = [[batch(rows, length, seed=s)] for s, (rows, length) in enumerate([shapes[0], *shapes])]
    work = workloads.Workload(method, config, model_dir, steps, warmup=1, encoded_rows=len(steps), truncated_rows=0,
                              pad_id=pad_id, pad_multiple=None)
    spec = workloads.save(work, folder / "workload")
    result = harness.run_child(spec, backend, threads, folder, measure_gemm=False)
    if not result.get("available", True) or "steps" not in result:
        raise UserError(f"plan: the {backend} training step did not run: {result.get('reason')}")
    return [float(r["peak_memory_gb"]) for r in result["steps"] if r["timed"]]


def device_budget(backend: str) -> tuple[float | None, str]:
    """(GB, what it is) that train.memory_limit is a share of, as the training run would see it."""
    if backend == "mlx":
        from mlxft.backends.mlx import model as mlx_model

        return mlx_model.memory_budget()
    from mlxft.backends.torch import model as torch_model

    return torch_model.memory_budget(torch_model.pick_device())


def plan(config: RunConfig, backend: str, *, method: str = SFT_RECIPES_METHOD, threads: int | None = None,
         out: Path | None = None, echo=print) -> dict:
    """Measure, fit and say what fits; returns the figures (also what it prints)."""
    import json
    import os

    from mlxft.models.files import load_tokenizer, pad_id, resolve_model_dir

    if method not in PLANNED:
        raise NotImplementedYet(f"mlxft plan measures SFT (mlxft lora), DPO, reward and RL recipes, not {method} recipes")
    if config.lora.full_finetune:
        raise NotImplementedYet("mlxft plan measures LoRA steps for now; full fine-tuning is not measured "
                                "(--set lora.full_finetune=false plans the LoRA run)")
    if method == "dpo":
        config.dpo.check()
        if config.dpo.loss_type == "kto":
            raise NotImplementedYet("mlxft plan does not measure KTO's step (unpaired rows) yet; the other dpo.loss_types it does")
    if method == "rl" and config.rl.max_prompt_length is None:
        raise UserError("mlxft plan measures rows of rl.max_prompt_length + rl.max_completion_length; set the prompt's "
                        "(--set rl.max_prompt_length=512)")
    model_dir = resolve_model_dir(config.model.name)
    model_config = json.loads((model_dir / "config.json").read_text())
    vocab = int(model_config.get("vocab_size") or 0)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=config.model.trust_remote_code)
    setting, unit = PLANNED[method]
    batch_setting, offset = "train.batch_size", 0  # the knobs the largest batch and length are given in
    if method == "rl":  # a step's peak is one pass's: rl.completions_per_pass rows of [prompt | completion]
        rc = config.rl
        completions = config.train.batch_size * rc.num_generations
        rows, batch_setting = min(rc.completions_per_pass or completions, completions), "rl.completions_per_pass"
        offset = rc.max_prompt_length or 0
        length = offset + rc.max_completion_length
    elif method == "lora" and config.data.packing and config.data.packing_length:  # rows of the packed width
        setting, length, rows = "data.packing_length", config.data.packing_length, config.train.batch_size
    else:
        length, rows = (config.data.cutoff if method == "lora" else getattr(config, method).max_length), config.train.batch_size
    if length is None:
        raise UserError(f"mlxft plan measures rows of {setting}; it is not set (--set {setting}=1024)")
    budget, where = device_budget(backend)
    share = config.train.memory_limit or 1.0
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="mlxft-plan-"))
    threads = threads or os.cpu_count() or 1
    echo(f"plan: {config.recipe} on {model_dir} ({backend}); measuring 1 and 2 {unit} of {length} tokens and 1 of "
         f"{length // 2}")

    def measured_fit(config: RunConfig, where: Path) -> tuple[dict, Fit]:
        measured = measure_peaks(config, model_dir, backend, [(1, length // 2), (1, length), (2, length)], vocab,
                                 pad_id(tokenizer), where, threads, method)
        peaks = dict(zip(("one_half", "one_full", "two_full"), measured))
        return peaks, fit(peaks["one_full"], peaks["two_full"], peaks["one_half"], length)

    try:
        peaks, model = measured_fit(config, folder)
        limit = share * budget if budget else None
        checkpointed = None  # (the config, its peaks, its fit) with gradient checkpointing, when measured
        if limit is not None and model.peak(rows, length) > limit and not config.train.grad_checkpoint:
            echo("plan: it does not fit; measuring the same steps with gradient checkpointing")
            changed = checkpointing_config(config, backend)
            checkpointed = (changed, *measured_fit(changed, folder / "grad_checkpoint"))
    finally:
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
    need = model.peak(rows, length)
    limit_positions = int(model_config.get("max_position_embeddings") or 0) or None
    result = {"recipe": config.recipe, "backend": backend, "model": str(model_dir), "measured_gb": peaks,
              "fit": {"fixed_gb": model.fixed, "per_token_gb": model.linear, "per_token_squared_gb": model.square},
              "batch_size": rows, "length_setting": setting, "cutoff": length, "predicted_peak_gb": need, "budget_gb": budget,
              "budget_is": where, "memory_limit": share, "limit_gb": limit}
    echo(f"measured peaks: 1 x {length}: {peaks['one_full']:.2f} GB; 2 x {length}: {peaks['two_full']:.2f} GB; "
         f"1 x {length // 2}: {peaks['one_half']:.2f} GB (fixed {model.fixed:.2f} GB, one {unit[:-1]} of {length} tokens "
         f"{model.per_row(length):.3f} GB)")
    verdict = ("" if limit is None else
               f" {'fits' if need <= limit else 'does NOT fit'} in train.memory_limit={share:g} of {where} "
               f"({limit:.2f} of {budget:.2f} GB)")
    shape = f"{setting} {length}" if not offset else f"rows of rl.max_prompt_length {offset} + {setting} {length - offset}"
    echo(f"this run: {batch_setting} {rows} x {shape} needs about {need:.2f} GB;{verdict}")
    if method == "rl":
        echo("  (one training pass; sampling, which holds the KV cache of a prompt's completions, was not measured)")
    if method == "lora" and config.data.packing:
        echo(f"  (packed rows were measured as plain rows of {length} tokens: their block mask, rows x {length}^2 booleans, "
             "is not included)")
    if limit is not None:
        batch = model.largest_batch(length, limit)
        cutoff = model.largest_length(rows, limit)
        if limit_positions:
            cutoff = min(cutoff, limit_positions)
        cutoff = max(cutoff - offset, 0)
        result.update({"largest_batch_size": batch, "largest_cutoff": cutoff})
        echo(f"largest {batch_setting} at {setting} {length - offset}: {batch}; largest {setting} at {batch_setting} "
             f"{rows}: {cutoff}" + (f" (the model's limit is {limit_positions})" if limit_positions else ""))
    if checkpointed is not None:
        changed, peaks_then, model_then = checkpointed
        need_then = model_then.peak(rows, length)
        batch_then = model_then.largest_batch(length, limit)
        result["with_grad_checkpoint"] = {"measured_gb": peaks_then, "predicted_peak_gb": need_then,
                                          "largest_batch_size": batch_then, "fits": need_then <= limit}
        settings = "--set train.grad_checkpoint=true" + (" --set lora.dropout=0" if changed.lora.dropout != config.lora.dropout else "")
        echo(f"with gradient checkpointing ({settings}): about {need_then:.2f} GB, which "
             f"{'fits' if need_then <= limit else 'does not fit either'}; largest {batch_setting} then: {batch_then}")
    return result


def checkpointing_config(config: RunConfig, backend: str) -> RunConfig:
    """The run with train.grad_checkpoint on; on MLX also without LoRA dropout, which its
    checkpointing refuses (the recomputed forward would draw another mask)."""
    import copy

    changed = copy.deepcopy(config)
    changed.train.grad_checkpoint = True
    if backend == "mlx":
        changed.lora.dropout = 0.0
    return changed
