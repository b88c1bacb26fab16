"""K-shot sweeps (TALLRec's Table 1) and run plots, on a tiny model."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from mlxft.eval.plots import run_panels
from mlxft.methods.sweep import config_for, config_hash, summarize

FAST = ["data.max_history=3", "data.max_valid_rows=8", "data.split=[0.85,0.1,0.05]", "train.batch_size=4",
        "train.steps=2", "train.warmup_steps=1", "eval.every=0", "eval.patience=null", "train.checkpoint_every=100"]


def sweep_args(model, out, *extra):
    args = ["sweep", "--recipe", "tallrec", "--shots", "8,16", "--seeds", "0,1", "--model", str(model),
            "--out", str(out), "--backend", "mlx"]
    for setting in [*FAST, *extra]:
        args += ["--set", setting]
    return args


@pytest.mark.slow
def test_sweep_writes_the_table_plot_and_json_and_reuses_only_matching_runs(tiny_model_dir, tmp_path, monkeypatch):
    result = CliRunner().invoke(cli, sweep_args(tiny_model_dir, tmp_path / "sw"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sw/sweep.json").read_text())
    assert [(r["k"], r["seed"]) for r in report["runs"]] == [(8, 0), (8, 1), (16, 0), (16, 1)]
    assert [row["k"] for row in report["table"]] == [8, 16] and all(row["seeds"] == 2 for row in report["table"])
    # Every run is scored on the same test rows; the seeds drew different training rows.
    assert len({r["test_rows"] for r in report["runs"]}) == 1 and report["runs"][0]["test_rows"] > 100
    row = report["table"][0]
    assert row["auc_mean"] == pytest.approx(np.mean(row["aucs"]))
    assert "| 8 |" in (tmp_path / "sw/sweep.md").read_text()
    png = (tmp_path / "sw/sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # Same command again: every run is reused, nothing trains.
    def no_training(*a, **k):
        raise AssertionError("a finished run with the same config was trained again")

    monkeypatch.setattr("mlxft.methods.sft.train", no_training)
    monkeypatch.setattr("mlxft.eval.yes_no.score_yes_no", no_training)
    again = CliRunner().invoke(cli, sweep_args(tiny_model_dir, tmp_path / "sw"))
    assert again.exit_code == 0, again.output
    assert again.output.count("reused") == 4
    # Another learning rate is another config: the old results are not reused for it.
    changed = CliRunner().invoke(cli, sweep_args(tiny_model_dir, tmp_path / "sw", "train.learning_rate=1e-3"))
    assert changed.exit_code != 0 and "trained again" in str(changed.exception)


def test_seeds_draw_other_rows_but_keep_the_split(tiny_model_dir):
    from mlxft.data.dataset import load_splits

    a = load_splits(config_for("tallrec", [f"model.name={tiny_model_dir}"], 16, 0).data)
    b = load_splits(config_for("tallrec", [f"model.name={tiny_model_dir}"], 16, 1).data)
    assert [r.origin for r in a.test] == [r.origin for r in b.test]
    assert [r.origin for r in a.train] != [r.origin for r in b.train]
    c = load_splits(config_for("tallrec", [f"model.name={tiny_model_dir}"], 64, 0).data)
    assert {r.origin for r in a.train} <= {r.origin for r in c.train}  # 16 rows nested in the 64
    assert config_hash(config_for("tallrec", [], 16, 0)) != config_hash(config_for("tallrec", [], 16, 1))


def test_summary_uses_the_sample_standard_deviation():
    table = summarize([{"k": 16, "auc": 0.5}, {"k": 16, "auc": 0.7}, {"k": 64, "auc": 0.6}])
    assert table[0]["auc_mean"] == pytest.approx(0.6) and table[0]["auc_std"] == pytest.approx(0.1414214, rel=1e-6)
    assert table[1] == {"k": 64, "auc_mean": 0.6, "auc_std": 0.0, "seeds": 1, "aucs": [0.6]}


def test_plot_of_a_run(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3, "tokens_per_second": 100.0},
               {"step": 2, "loss": 1.5, "learning_rate": 2e-3, "tokens_per_second": 110.0, "eval_loss": 1.7,
                "eval_auc": 0.6, "eval_tokens": 30, "eval_rows": 10}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    panels = run_panels(records)
    assert list(panels) == ["loss", "auc", "learning rate", "tokens per second"]
    assert [label for label, _, _ in panels["loss"]] == ["train", "validation"]
    assert panels["loss"][1][1:] == ([2], [1.7])
    result = CliRunner().invoke(cli, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    missing = CliRunner().invoke(cli, ["plot", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "no metrics.jsonl" in missing.output
