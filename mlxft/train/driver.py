"""The run driver: what every trainer does around its step, written once for every method and
backend. A method (mlxft.methods.<method>) sets up its model, data and step, hands them
over as a `Trainer`, and gets back what the run did:

    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_batches,
                        pad_id=pad_id, pad_multiple=PAD_MULTIPLE, echo=echo)
    summary = driver.summarize_run(run, config, fitted, method="sft", backend="mlx", ...)

What the driver owns, so that no trainer can get it differently:
- the batch stream, resume-exact: epoch e's order depends only on (seed, e), and a resumed run
  skips exactly the micro-batches it trained on;
- the learning-rate schedule, evaluated at the step the optimizer takes;
- the report window (loss and the method's statistics over the steps since the last report,
  tokens/s, peak memory) every train.report_every steps, into metrics.jsonl and the progress bar;
- validation every eval.every steps, the best adapter (best/), early stopping after eval.patience
  evaluations without improvement;
- the checkpoint every train.checkpoint_every steps (and at an early stop), truncating the log of a
  resumed run to its checkpoint;
- the metrics before and after training, last/ and best/ at the end, and summary.json.
- on a shared Linux CPU, the compute threads: fewer while other processes take cores (mlxft.cpu_share).

A step takes the micro-batches of one optimizer step and returns the *sums* of the method's
statistics over them: sums[0] is what the loss is a sum over (scored tokens for SFT, pairs for
DPO) and sums[1] the loss sum; `Trainer.summarize` turns sums into metrics. Windows add sums and
divide once, so a report over k steps is the mean over all their tokens (or pairs), not a mean of
per-step means.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mlxft.config import HIGHER_IS_BETTER, RunConfig, dump_config
from mlxft.cpu_share import CpuShare
from mlxft.data.batching import iterate_batches
from mlxft.errors import UserError
from mlxft.train import memory
from mlxft.train.distributed import World, data_digest
from mlxft.train.first_step import FirstStepCheck
from mlxft.train.progress import Progress
from mlxft.train.runs import Run
from mlxft.train.schedule import learning_rate


@dataclass
class StepResult:
    sums: np.ndarray  # the method's statistic sums over the step's micro-batches (see the module docstring)
    grad_norm: float  # before clipping
    learning_rate: float  # as the optimizer applied it (MLX keeps it in float32)
    probes: list | None = None  # mlxft.train.first_step.TensorProbe per trainable tensor, when the step was asked to probe


@dataclass
class MemoryMeter:
    """A backend's memory figures, as the driver reports them and guards against train.memory_limit."""

    peak_gb: Callable[[], float]  # the backend's own count (MLX's, CUDA's allocator; the CPU's: peak RSS)
    reset_peak: Callable[[], None]
    budget: Callable[[], tuple[float | None, str]]  # (GB, what it is) that train.memory_limit is a share of
    details: Callable[[], dict] = dict  # more figures for the report (MLX: active and cache memory)


@dataclass
class Trainer:
    """A trainer's step and its ways to measure and save, as the driver calls them."""

    step: Callable[..., StepResult]  # (step index, micro-batches, learning rate, probe=False)
    validate: Callable[[], dict]  # eval_* metrics of the model as it is; {} without validation data
    summarize: Callable[[np.ndarray], dict]  # sums -> {"loss": ..., the method's other metrics}
    save_weights: Callable[[Path], None]  # the adapter (or full model) into a folder
    save_checkpoint: Callable[[int, dict | None, int, dict], None]  # (step, best, stale, progress), atomically
    memory: MemoryMeter
    waits_for_signal: bool = False  # online RL: a step whose rewards are all equal has no gradient, and is no fault
    saves_on_every_rank: bool = False  # sharded weights (train.fsdp): every rank gathers, rank 0 writes


def memory_over_limit(trainer: Trainer, share: float | None, budget: float | None, where: str,
                      world: World) -> tuple | None:
    """(peak GB, budget GB, what the budget is) when the run's peak passed `share` of its device's
    memory (`budget` GB, `where`: trainer.memory.budget(), read once) on any rank (every rank
    learns it, so that all stop together); else None."""
    budget = budget if share else None
    peak = trainer.memory.peak_gb() if budget else 0.0
    over = bool(budget) and peak > share * budget
    if world.size > 1:  # every rank takes part, so that all stop together; numbers from those over
        ranks, peaks, budgets = world.all_sum([over, peak * over, (budget or 0.0) * over])
        if ranks and not over:
            return float(peaks / ranks), float(budgets / ranks), "another rank's device"
    return (peak, budget, where) if over else None


@dataclass
class Start:
    """Where the loop starts: step 0 of a new run, or a resumed run's checkpoint."""

    step: int = 0
    best: dict | None = None
    stale: int = 0


@dataclass
class Fitted:
    steps: int
    total_steps: int
    stopped_early: bool
    trained_tokens: int
    best: dict | None
    before: dict
    after: dict
    baseline: dict = field(default_factory=dict)  # what `fit(baseline=...)` measured before training


def fit(run: Run, config: RunConfig, trainer: Trainer, train_set: list, *, start: Start, iterate, pad_id: int,
        pad_multiple: int, baseline: Callable[[], dict] | None = None, world: World = World(), echo=print) -> Fitted:
    """Train from `start` to the run's last step; measure before and after, save best/ and last/.
    `iterate` makes one epoch's micro-batches (mlxft.data.batching.iterate_batches or
    iterate_pair_batches); `baseline()` measures anything else worth keeping from before training,
    under keys named before_* (kept in summary.json, read back on resume instead of measured again).

    With several ranks (`world`) every rank runs this loop in step and rank 0 alone writes: reports,
    checkpoints, weights and summary. `trainer.validate` reduces across ranks, so that every rank
    takes the same best/early-stop decisions."""
    tc, ec = config.train, config.eval
    if world.size > 1:
        world.check_same("configuration", hashlib.sha256(dump_config(config).encode()).hexdigest())
        world.check_same("training data", data_digest(train_set))
    total_steps = count_steps(tc, len(train_set))
    step, best, stale = start.step, start.best, start.stale
    if run.resumed:
        if world.main:
            run.truncate_log(step)  # reports after the checkpoint will be written again
        echo(f"resumed {run.folder} at step {step}")

    # --- before training: measured once, read back on resume -------------------------------------
    summary_path = run.folder / "summary.json"
    earlier = json.loads(summary_path.read_text()) if run.resumed and summary_path.exists() else None
    if world.size > 1:  # rank 0's folder decides, so that every rank validates, or none does
        earlier = (earlier or {}) if world.all_sum([earlier is not None and world.main])[0] else None
    if earlier is not None:
        before = earlier.get("before", {})
        extra = {k: v for k, v in earlier.items() if k.startswith("before_")} if baseline else {}
    else:
        before = trainer.validate()
        extra = baseline() if baseline and world.main else {}
        if world.main:
            run.write_summary({"before": before, **extra})
    if before:
        echo("before training: " + describe(before, "eval_"))

    # --- the loop --------------------------------------------------------------------------------
    batches = batch_stream(train_set, tc, pad_id, skip=step * tc.grad_accumulation, pad_to_multiple=pad_multiple,
                           iterate=iterate)
    progress = Progress(total_steps, initial=step, enabled=world.main)
    saves = world.main or trainer.saves_on_every_rank  # sharded weights: every rank gathers, rank 0 writes
    trained_tokens, window = resume_progress(run) if run.resumed else (0, Window())
    trainer.memory.reset_peak()
    budget = trainer.memory.budget() if tc.memory_limit else (None, "")  # the device's memory does not change
    threads = CpuShare(echo)  # fewer compute threads while other processes take cores (Linux CPUs)
    stopped_early = False
    # Probed at every start, a resumed one too: the step is compiled again after the optimizer is restored.
    check = FirstStepCheck(learning_rate=tc.learning_rate, waits_for_signal=trainer.waits_for_signal,
                           enabled=tc.check_first_step)
    saved_at = step  # the checkpoint a stopped run resumes from (0: none)
    while step < total_steps:
        micro_batches, epoch = [], 0.0
        for _ in range(tc.grad_accumulation):
            batch, epoch = next(batches)
            micro_batches.append(batch)
        rate = learning_rate(step, peak=tc.learning_rate, total_steps=total_steps, warmup_steps=tc.warmup_steps,
                             schedule=tc.schedule, minimum=tc.min_learning_rate)
        result = trainer.step(step, micro_batches, rate, probe=True) if check.pending else trainer.step(
            step, micro_batches, rate)
        step += 1
        threads.update()  # between steps: no product is running
        try:
            passed = check.observe(step, result.probes, float(result.sums[0]), result.learning_rate) \
                if check.pending else None
            loss = trainer.summarize(result.sums)["loss"]
            if not (math.isfinite(loss) and math.isfinite(result.grad_norm)):
                raise TrainingDiverged(diverged_message(step, loss, result.grad_norm, saved_at, run))
        except UserError:
            progress.close()
            raise
        if passed:
            progress.report(passed)
        tokens = sum(b.tokens for b in micro_batches)
        trained_tokens += tokens
        window.add(result.sums, tokens)
        progress.update(loss=loss)

        evaluate_now = ec.every and step % ec.every == 0 and step < total_steps
        if step % tc.report_every == 0 or step == total_steps or evaluate_now:
            tokens_per_second = window.tokens / (time.perf_counter() - window.start)
            trained = trainer.summarize(window.sums)
            record = {"step": step, "epoch": round(epoch, 3), "loss": trained.pop("loss"),
                      "learning_rate": result.learning_rate, "grad_norm": result.grad_norm,
                      "tokens_per_second": tokens_per_second, "trained_tokens": trained_tokens,
                      "peak_memory_gb": trainer.memory.peak_gb(), "peak_rss_gb": memory.peak_rss_gb(),
                      **trainer.memory.details(), **trained}
            measured = trainer.validate() if evaluate_now else {}
            if measured:  # {}: no validation rows
                record.update(measured)
                best, stale, improved = track_best(record, best, stale, ec.metric)
                if improved and saves:
                    trainer.save_weights(run.folder / "best")
            if world.main:
                run.log(record)
            progress.set_rate(tokens_per_second)
            progress.report(f"step {step}/{total_steps}: " + describe({k: v for k, v in record.items()
                                                                     if k != "step" and v is not None}))
            window = Window()
            if ec.patience and stale >= ec.patience:
                echo(f"early stop at step {step}: no better eval_{ec.metric} for {stale} evaluations")
                stopped_early = True
        over = memory_over_limit(trainer, tc.memory_limit, *budget, world)  # stop before the next step swaps
        if (step % tc.checkpoint_every == 0 or stopped_early or over) and saves:
            trainer.save_checkpoint(step, best, stale, {"trained_tokens": trained_tokens, **window.state()})
            saved_at = step
        if over:
            progress.close()
            raise memory.MemoryLimitReached(memory.limit_message(*over, tc.memory_limit, step))
        if stopped_early:
            break
    progress.close()

    # --- after training --------------------------------------------------------------------------
    after = trainer.validate()
    if after:
        echo("after training:  " + describe(after, "eval_"))
        best, stale, improved = track_best({"step": step, **after}, best, stale, ec.metric)
        if improved and saves:
            trainer.save_weights(run.folder / "best")
    if saves:
        trainer.save_weights(run.folder / "last")
    return Fitted(step, total_steps, stopped_early, trained_tokens, best, before, after, extra)


class TrainingDiverged(UserError):
    """The loss or the gradient stopped being finite: the run stops with its last checkpoint kept."""


def diverged_message(step: int, loss: float, grad_norm: float, saved_at: int, run: Run) -> str:
    kept = (f"its checkpoint of step {saved_at} is kept (--resume {run.folder} goes on from it)" if saved_at else
            "no checkpoint had been written yet")
    return (f"step {step}: the loss is {loss:.4g} and the gradient norm {grad_norm:.4g}, so the run stops here; "
            f"{kept}; a lower train.learning_rate or train.max_grad_norm usually cures it")


class Window:
    """The sums and tokens since the last report, and when it began. float64: a long window adds
    many float32 step sums."""

    def __init__(self, sums=None):
        self.sums = np.asarray(sums, dtype=np.float64) if sums is not None else 0.0
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, sums: np.ndarray, tokens: int) -> None:
        self.sums = self.sums + np.asarray(sums, dtype=np.float64)
        self.tokens += tokens

    def state(self) -> dict:
        """What a checkpoint keeps of an open window: its sums. Not its tokens and clock: tokens/s
        after a resume counts what the resumed process trained, in its own time."""
        return {"window_sums": np.asarray(self.sums).tolist() if np.ndim(self.sums) else None}


def resume_progress(run: Run) -> tuple[int, Window]:
    """(tokens trained, the report window left open) at a resumed run's checkpoint, so that the
    reports after it are those of an uninterrupted run. Checkpoints written before they kept this
    fall back to the last report's count and a fresh window."""
    progress = run.checkpoint_state().get("progress") if (run.checkpoint_dir / "state.json").exists() else None
    if not progress:
        return sum(r.get("trained_tokens", 0) for r in run.metrics()[-1:]), Window()
    return progress["trained_tokens"], Window(progress["window_sums"])


def summarize_run(run: Run, config: RunConfig, fitted: Fitted, trainer: Trainer, *, method: str, backend: str,
                  device: str, model: str, trainable: int, setup: dict | None = None, data: dict | None = None,
                  outputs: dict | None = None) -> dict:
    """summary.json, written and returned: the run's common keys, with the method's own `setup`
    (after the model), `data` (after the trainable parameters) and `outputs` (at the end)."""
    history = run.metrics()
    summary = {
        "recipe": config.recipe,
        "method": method,
        "backend": backend,
        "device": device,
        "model": model,
        **(setup or {}),
        "steps": fitted.steps,
        "stopped_early": fitted.stopped_early,
        "trainable_parameters": trainable,
        **(data or {}),
        "before": fitted.before,
        "after": fitted.after,
        "best": fitted.best,
        "final_loss": history[-1]["loss"] if history else None,
        "tokens_per_second": mean_rate(history),
        "trained_tokens": fitted.trained_tokens,
        "peak_memory_gb": max((r["peak_memory_gb"] for r in history), default=trainer.memory.peak_gb()),
        "adapter": str(run.folder / "best" if (run.folder / "best").exists() else run.folder / "last"),
        **(outputs or {}),
    }
    run.write_summary(summary)
    return summary


def pair_validation(model, valid_set: list, sums_of, summarize, *, statistics: int, batch_size: int, pad_id: int,
                    pad_multiple: int, world: World = World()):
    """validate() -> eval_* metrics over the validation pairs ({} without any), for a method whose
    step reports pair statistics (DPO, reward models). Each rank scores its share of the pairs,
    `sums_of(pairs, rows)` giving a batch's statistic sums (numpy; `rows` maps the batch's pair
    indices to the split's), and the sums are added across ranks before `summarize`."""
    from mlxft.data.batching import iterate_pair_batches

    def validate() -> dict:
        if not valid_set:
            return {}
        model.eval()
        sums = np.zeros(statistics, np.float32)
        rows = world.share(len(valid_set))
        for pairs in iterate_pair_batches([valid_set[i] for i in rows], batch_size, pad_id, shuffle=False,
                                          pad_to_multiple=pad_multiple):
            sums = sums + sums_of(pairs, rows)
        model.train()
        return {f"eval_{k}": v for k, v in summarize(world.all_sum(sums)).items()}

    return validate


# --- the pieces the loop is made of ----------------------------------------------------------------


def batch_stream(examples, tc, pad_id, skip: int, pad_to_multiple: int, iterate=iterate_batches):
    """Micro-batches forever, epoch after epoch; epoch e's order depends only on (seed, e), so a
    resumed run skips exactly the batches it already trained on. `iterate` makes one epoch's
    batches (iterate_pair_batches for preference pairs); each backend pads to its own PAD_MULTIPLE."""
    per_epoch = math.ceil(len(examples) / tc.batch_size)
    epoch = skip // per_epoch
    offset = skip % per_epoch
    while True:
        for i, batch in enumerate(iterate(examples, tc.batch_size, pad_id, seed=tc.seed * 7919 + epoch,
                                          pad_to_multiple=pad_to_multiple)):
            if i < offset:
                continue
            yield batch, epoch + (i + 1) / per_epoch
        epoch, offset = epoch + 1, 0


def count_steps(tc, rows: int) -> int:
    """Optimizer steps of a run: train.steps, else train.epochs (default 1) over `rows` rows."""
    if tc.steps:
        return tc.steps
    micro_per_epoch = math.ceil(rows / tc.batch_size)
    return max(1, math.ceil((tc.epochs or 1) * micro_per_epoch / tc.grad_accumulation))


def track_best(record, best, stale, metric):
    key = f"eval_{metric}"
    if key not in record:
        raise UserError(f"eval.metric '{metric}' is not measured on this data (have: "
                        f"{', '.join(k[5:] for k in record if k.startswith('eval_'))})")
    value = record[key]
    better = best is None or (value > best["value"] if metric in HIGHER_IS_BETTER else value < best["value"])
    if better:
        return {"metric": metric, "value": value, "step": record["step"]}, 0, True
    return best, stale + 1, False


def describe(metrics: dict, strip: str = "") -> str:
    """'loss 0.2310, auc 0.5320' from {'eval_loss': ..., 'eval_auc': ...} with strip='eval_'."""
    return ", ".join(f"{k.removeprefix(strip)} {v:.4g}" if isinstance(v, float) else f"{k.removeprefix(strip)} {v}"
                     for k, v in metrics.items())


def mean_rate(history):
    rates = [r["tokens_per_second"] for r in history if "tokens_per_second" in r]
    return float(np.mean(rates)) if rates else None
