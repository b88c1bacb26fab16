"""The run driver (mlxft.train.driver) with a scripted trainer: no model, no backend. What every trainer
gets from it: report windows, evaluation cadence, best/early stop, checkpoints, resume."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from mlxft.config import load_config
from mlxft.train import driver
from mlxft.train.runs import Run


@dataclass
class FakeBatch:
    rows: tuple
    tokens: int


def iterate(examples, batch_size, pad_id, seed, pad_to_multiple):
    """One epoch of batches in an order that depends on the seed only, as the real iterators do."""
    order = np.random.default_rng(seed).permutation(len(examples))
    for i in range(0, len(order), batch_size):
        rows = tuple(int(examples[j]) for j in order[i : i + batch_size])
        yield FakeBatch(rows, tokens=10 * len(rows))


class Scripted:
    """A trainer whose step i has loss sum i + 1 over i + 2 tokens, and whose validation losses
    are read from a list: what the driver does with them is then known exactly."""

    def __init__(self, eval_losses=(), peak_per_step=0.0, nan_from=None):
        self.eval_losses, self.peak_per_step = list(eval_losses), peak_per_step  # peak memory grows by that (GB) a step
        self.nan_from = nan_from  # the loss sums are NaN from that step (1-based) on
        self.seen, self.saved, self.checkpoints, self.validations = [], [], [], 0

    def step(self, index, batches, rate, probe=False):  # no probes: the first steps' check has nothing to read
        self.seen.extend(b.rows for b in batches)
        self.peak_gb = self.peak_per_step * (index + 1)
        loss = float("nan") if self.nan_from and index + 1 >= self.nan_from else index + 1.0
        return driver.StepResult(np.array([index + 2.0, loss], np.float32), grad_norm=0.5, learning_rate=rate)

    def validate(self):
        self.validations += 1
        return {"eval_loss": self.eval_losses.pop(0)} if self.eval_losses else {}

    def save_checkpoint(self, step, best, stale, progress):
        """What the backends' checkpoint.save writes, without the weights: state.json."""
        self.checkpoints.append((step, best, stale))
        self.run.checkpoint_dir.mkdir(exist_ok=True)
        state = {"step": step, "best": best, "stale": stale, "backend": "mlx", "progress": progress}
        (self.run.checkpoint_dir / "state.json").write_text(json.dumps(state))

    def trainer(self) -> driver.Trainer:
        return driver.Trainer(step=self.step, validate=self.validate,
                              summarize=lambda sums: {"loss": float(sums[1]) / float(sums[0])},
                              save_weights=lambda folder: self.saved.append(folder.name),
                              save_checkpoint=self.save_checkpoint,
                              memory=driver.MemoryMeter(lambda: self.peak_gb, lambda: None, lambda: (10.0, "a test budget"),
                                                        lambda: {"active_memory_gb": self.peak_gb / 2}))

    peak_gb = 0.0


def config(tmp_path, *sets):
    return load_config(None, [f"out={tmp_path / 'run'}", "train.batch_size=2", "train.warmup_steps=0",
                              "eval.every=0", *sets])


def fit(run, cfg, scripted, start=driver.Start(), rows=10, **kwargs):
    scripted.run = run
    return driver.fit(run, cfg, scripted.trainer(), list(range(rows)), start=start, iterate=iterate, pad_id=0,
                      pad_multiple=1, echo=lambda *a: None, **kwargs)


def test_reports_sum_the_window_and_divide_once(tmp_path):
    cfg = config(tmp_path, "train.steps=7", "train.report_every=3")
    run = Run.create(tmp_path / "run", cfg)
    fitted = fit(run, cfg, Scripted())
    records = run.metrics()
    assert [r["step"] for r in records] == [3, 6, 7]
    # steps 1-3 have loss sums 1, 2, 3 over 2, 3, 4 tokens: 6 / 9, not the mean of 1/2, 2/3, 3/4
    assert records[0]["loss"] == pytest.approx(6 / 9, abs=1e-12)
    assert records[1]["loss"] == pytest.approx((4 + 5 + 6) / (5 + 6 + 7), abs=1e-12)
    assert records[2]["loss"] == pytest.approx(7 / 8, abs=1e-12)
    assert [r["trained_tokens"] for r in records] == [60, 120, 140]  # 2 rows of 10 tokens a step
    assert fitted.steps == 7 and fitted.trained_tokens == 140 and not fitted.stopped_early


def test_best_adapter_early_stop_and_a_checkpoint_where_it_stopped(tmp_path):
    # Validation losses: 9 before; 5 (best), 6, 4 (best), 7, 8 at steps 2-10: the second evaluation
    # without improvement (patience 2) stops the run at step 10; 9.5 after, no better.
    cfg = config(tmp_path, "train.steps=20", "eval.every=2", "eval.patience=2", "train.checkpoint_every=100")
    run = Run.create(tmp_path / "run", cfg)
    scripted = Scripted([9.0, 5.0, 6.0, 4.0, 7.0, 8.0, 9.5])
    fitted = fit(run, cfg, scripted)
    assert fitted.stopped_early and fitted.steps == 10
    assert fitted.best == {"metric": "loss", "value": 4.0, "step": 6}
    assert scripted.saved == ["best", "best", "last"]  # best/ at steps 2 and 6
    assert scripted.checkpoints == [(10, fitted.best, 2)]  # the early stop is checkpointed
    assert fitted.before == {"eval_loss": 9.0} and fitted.after == {"eval_loss": 9.5}
    assert [r.get("eval_loss") for r in run.metrics()] == [5.0, 6.0, 4.0, 7.0, 8.0]


def test_the_last_evaluation_counts_for_best(tmp_path):
    cfg = config(tmp_path, "train.steps=4", "eval.every=2")
    run = Run.create(tmp_path / "run", cfg)
    scripted = Scripted([9.0, 5.0, 3.0])  # before, step 2, after (step 4)
    fitted = fit(run, cfg, scripted)
    assert fitted.best == {"metric": "loss", "value": 3.0, "step": 4}
    assert scripted.saved == ["best", "best", "last"]


def test_a_resumed_run_trains_only_the_batches_it_had_not_seen(tmp_path):
    cfg = config(tmp_path, "train.steps=9", "train.grad_accumulation=2", "train.report_every=1")
    whole = Scripted()
    fit(Run.create(tmp_path / "run", cfg), cfg, whole)  # 9 steps of 2 micro-batches over 5 batches an epoch

    cfg2 = config(tmp_path / "b", "train.steps=9", "train.grad_accumulation=2", "train.report_every=1")
    first = Run.create(tmp_path / "b" / "run", cfg2)
    fit(first, cfg2, Scripted(), start=driver.Start())
    first.release()
    run = Run(tmp_path / "b" / "run", resumed=True)  # as if killed after a checkpoint at step 4
    tail = Scripted()
    fitted = fit(run, cfg2, tail, start=driver.Start(step=4))
    assert tail.seen == whole.seen[8:]  # steps 5-9: micro-batches 9-18, across the epoch boundary
    assert fitted.steps == 9
    assert [r["step"] for r in run.metrics()] == list(range(1, 10))  # reports after step 4 were written again, once
    assert run.metrics()[-1]["trained_tokens"] == 9 * 2 * 20


def test_the_baseline_is_measured_once_and_read_back_on_resume(tmp_path):
    cfg = config(tmp_path, "train.steps=2")
    run = Run.create(tmp_path / "run", cfg)
    scripted = Scripted([3.0, 2.0])
    fit(run, cfg, scripted, baseline=lambda: {"before_answers": ["a", "b"]})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"before": {"eval_loss": 3.0},
                                                                         "before_answers": ["a", "b"]}
    resumed = Scripted([1.0])  # only the "after" validation runs again
    fitted = fit(Run(tmp_path / "run", resumed=True), cfg, resumed, start=driver.Start(step=1),
                 baseline=lambda: pytest.fail("measured again"))
    assert resumed.validations == 1
    assert fitted.before == {"eval_loss": 3.0} and fitted.baseline == {"before_answers": ["a", "b"]}


def test_ranks_check_that_they_run_the_same_config_before_training(tmp_path):
    from mlxft.errors import UserError
    from mlxft.train.distributed import World

    class OtherRankDiffers(World):
        def all_sum(self, values):  # rank 1 contributes 0 to "rank 0's value" and 1 to "ranks that differ"
            values = np.asarray(values, dtype=np.float32)
            return values + (1.0 if values[0] == 0 else 0.0)

    cfg = config(tmp_path, "train.steps=2")
    scripted = Scripted()
    with pytest.raises(UserError, match="1 of the 2 ranks disagree with rank 0 on the configuration"):
        fit(Run.create(tmp_path / "run", cfg), cfg, scripted, world=OtherRankDiffers(0, 2))
    assert scripted.seen == []  # nothing trained


def test_a_run_without_validation_rows_trains_past_its_evaluation_steps(tmp_path):
    cfg = config(tmp_path, "train.steps=4", "eval.every=2")
    run = Run.create(tmp_path / "run", cfg)
    fitted = fit(run, cfg, Scripted())  # validate() gives {}: nothing to evaluate, nothing to compare
    assert fitted.steps == 4 and fitted.best is None
    assert all("eval_loss" not in r for r in run.metrics())


def test_reports_after_a_resume_are_those_of_the_uninterrupted_run(tmp_path, stop_after_step):
    # Reports every 3 steps, checkpoints every 4: the run resumes in the middle of a report window.
    sets = ["train.steps=9", "train.report_every=3", "train.checkpoint_every=4"]
    whole = Run.create(tmp_path / "a", config(tmp_path / "a", *sets))
    fit(whole, config(tmp_path / "a", *sets), Scripted())
    cfg = config(tmp_path / "b", *sets)
    killed = Run.create(tmp_path / "b", cfg)
    stop_after_step(5)
    with pytest.raises(KeyboardInterrupt):
        fit(killed, cfg, Scripted())
    killed.release()
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["progress"] == {"trained_tokens": 80, "window_sums": [5.0, 4.0]}  # step 4's sums
    resumed = Run(tmp_path / "b", resumed=True)
    fit(resumed, cfg, Scripted(), start=driver.Start(step=4))
    keys = ("step", "loss", "trained_tokens")
    assert [[r[k] for k in keys] for r in resumed.metrics()] == [[r[k] for k in keys] for r in whole.metrics()]


def test_a_run_that_passes_its_memory_limit_stops_with_its_checkpoint_written(tmp_path):
    # Peak memory 1.5 GB more each step against a 10 GB budget: 0.5 of it is passed at step 4 (6 GB).
    from mlxft.train.memory import MemoryLimitReached

    cfg = config(tmp_path, "train.steps=8", "train.report_every=1", "train.memory_limit=0.5")
    run = Run.create(tmp_path / "run", cfg)
    scripted = Scripted(peak_per_step=1.5)
    with pytest.raises(MemoryLimitReached, match=r"after step 4: .* 6\.00 GB, passed train.memory_limit=0.5 of a test "
                                                 r"budget \(5\.00 of 10\.00 GB\)"):
        fit(run, cfg, scripted)
    assert scripted.checkpoints == [(4, None, 0)]
    records = run.metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # the step that passed it is reported
    assert records[-1]["peak_memory_gb"] == 6.0 and records[-1]["active_memory_gb"] == 3.0 and records[-1]["peak_rss_gb"] > 0
    # Without a guard the same run goes to its end.
    cfg = config(tmp_path / "b", "train.steps=8", "train.memory_limit=null")
    assert fit(Run.create(tmp_path / "b" / "run", cfg), cfg, Scripted(peak_per_step=1.5)).steps == 8


def test_a_loss_that_stops_being_finite_stops_the_run_with_its_last_checkpoint(tmp_path):
    cfg = config(tmp_path, "train.steps=10", "train.checkpoint_every=2")
    run = Run.create(tmp_path / "run", cfg)
    scripted = Scripted(nan_from=5)
    with pytest.raises(driver.TrainingDiverged, match=r"step 5: the loss is nan and the gradient norm 0.5, so the run "
                                                      r"stops here; its checkpoint of step 4 is kept \(--resume "):
        fit(run, cfg, scripted)
    assert [c[0] for c in scripted.checkpoints] == [2, 4]  # nothing written from the bad step
    assert [r["step"] for r in run.metrics()] == []  # report_every 10: the bad step reported nothing either
    assert json.loads((run.checkpoint_dir / "state.json").read_text())["step"] == 4  # what --resume goes on from


def test_a_run_diverging_before_its_first_checkpoint_says_none_was_written(tmp_path):
    cfg = config(tmp_path, "train.steps=10", "train.checkpoint_every=5")
    with pytest.raises(driver.TrainingDiverged, match="step 1: the loss is nan .* no checkpoint had been written yet"):
        fit(Run.create(tmp_path / "run", cfg), cfg, Scripted(nan_from=1))
