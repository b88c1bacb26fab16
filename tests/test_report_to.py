"""--report-to (mlxft.train.report_to): the reports of metrics.jsonl, also in TensorBoard's event files and
in an offline W&B run, read back with their own readers; nothing of them without the flag."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from click.testing import CliRunner
from test_driver import Scripted, config, fit

from mlxft.cli import cli
from mlxft.errors import UserError
from mlxft.train import driver, report_to
from mlxft.train.runs import Run

TINY_RUN = ["--recipe", "tallrec", "--backend", "mlx", "--set", "data.k_shot=16", "--set", "data.max_valid_rows=8",
            "--set", "train.batch_size=4", "--set", "train.steps=4", "--set", "train.report_every=1",
            "--set", "eval.every=2"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output and sum(line.startswith("error: ") for line in result.output.splitlines()) == 1


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def curve(records, key):
    return [(r["step"], r[key]) for r in records if key in r]


def same_curve(got, expected, rel):
    """The same steps, and values within `rel` (TensorBoard keeps float32)."""
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=rel)


def tensorboard_run(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder / "tensorboard"))
    accumulator.Reload()
    return accumulator


def tensorboard_curve(accumulator, tag):
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def wandb_runs(folder) -> list[list]:
    """The records of each offline W&B run under RUN/wandb/, oldest first. A .wandb file is a
    7-byte header, then LevelDB-log records (checksum, length, kind) of wandb_internal_pb2.Record
    in 32 KiB blocks; a record may be cut into pieces (kinds FIRST, MIDDLE, LAST) across blocks."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name):
        data, records, piece, pos = path.read_bytes(), [], b"", 7
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
            piece += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL, or the LAST piece
                records.append(wandb_internal_pb2.Record.FromString(piece))
                piece = b""
        runs.append(records)
    return runs


def wandb_history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def wandb_curve(history, key):
    return [(row["train/global_step"], row[key]) for row in history if key in row]


def test_reports_are_shown_as_train_and_eval_numbers():
    record = {"step": 7, "epoch": 0.5, "loss": 1.25, "trained_tokens": 900, "eval_loss": 2.0, "eval_rewards/accuracies": 0.75,
              "rewards/chosen": -0.5, "note": "text", "grad_norm": None, "stopped": True}
    assert report_to.scalars(record) == {"train/epoch": 0.5, "train/loss": 1.25, "train/trained_tokens": 900, "eval/loss": 2.0,
                                         "eval/rewards/accuracies": 0.75, "train/rewards/chosen": -0.5}


def test_report_to_names():
    assert report_to.parse_names("tensorboard") == ["tensorboard"]
    assert report_to.parse_names(" wandb, tensorboard,wandb ") == ["wandb", "tensorboard"]
    assert report_to.parse_names("none") == []
    for wrong in ("tensorbord", "none,wandb", ",", "all"):
        with pytest.raises(UserError, match="choose tensorboard, wandb, a comma list of them, or none"):
            report_to.parse_names(wrong)


def test_report_to_mistakes_are_one_line_errors_before_a_run_folder(tiny_model_dir, tmp_path, monkeypatch):
    base = ["lora", "--recipe", "tallrec", "--model", tiny_model_dir]
    one_line_error(run(*base, "--out", tmp_path / "a", "--report-to", "tensorbord"),
                   "--report-to 'tensorbord': choose tensorboard, wandb, a comma list of them, or none")
    one_line_error(run(*base, "--out", tmp_path / "b", "--set", "train.report_to=[mlflow]"),
                   "setting 'train.report_to' must be one of tensorboard, wandb, got 'mlflow'")
    one_line_error(run("lora", "--resume", tmp_path / "a", "--report-to", "wandb"), "--resume continues a run with its own config.yaml")
    for name in report_to.REPORT_TO:  # the package is missing: None in sys.modules makes its import fail
        monkeypatch.setitem(sys.modules, report_to.MODULES[name], None)
        one_line_error(run(*base, "--out", tmp_path / name, "--report-to", name),
                       f"--report-to {name} needs the {name} package: pip install 'mlxft[{name}]'")
    assert not any(tmp_path.iterdir())


def test_a_run_without_report_to_writes_and_imports_neither(tiny_model_dir, tmp_path, monkeypatch):
    for module in ("tensorboard", "wandb", *report_to.MODULES.values()):  # any import of them fails the run
        monkeypatch.setitem(sys.modules, module, None)
    result = run("lora", *TINY_RUN, "--model", tiny_model_dir, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert len(metrics(tmp_path / "run")) == 4
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()


@pytest.mark.slow  # one end-to-end run for both sinks: ~2.5 s of it trains, the rest imports tensorboard and wandb and starts W&B's service
def test_tensorboard_and_wandb_hold_the_reports_of_metrics_jsonl(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    folder = tmp_path / "run"
    result = run("lora", *TINY_RUN, "--model", tiny_model_dir, "--out", folder, "--report-to", "tensorboard,wandb")
    assert result.exit_code == 0, result.output
    records = metrics(folder)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and curve(records, "eval_auc")[0][0] == 2
    numeric = {report_to.metric_name(k) for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))}

    board = tensorboard_run(folder)
    assert set(board.Tags()["scalars"]) == numeric
    for key in ("loss", "learning_rate", "eval_loss", "eval_auc"):
        same_curve(tensorboard_curve(board, report_to.metric_name(key)), curve(records, key), rel=1e-6)
    config_text = board.Tensors("config")[0].tensor_proto.string_val[0].decode()  # indented: a code block
    assert [line[4:] for line in config_text.splitlines()] == (folder / "config.yaml").read_text().splitlines()
    assert "_hparams_/session_start_info" in board.Tags()["tensors"]

    (records_of_run,) = wandb_runs(folder)
    history = wandb_history(records_of_run)
    for key in ("loss", "learning_rate", "eval_loss", "eval_auc"):
        assert wandb_curve(history, report_to.metric_name(key)) == curve(records, key)  # JSON both ways: exact
    (header,) = [r.run for r in records_of_run if r.WhichOneof("record_type") == "run"]
    assert (header.run_id, header.display_name, header.project) == ((folder / "wandb" / "run-id").read_text().strip(), "run", "mlxft")
    train = json.loads(next(item.value_json for item in header.config.update if item.key == "train"))
    assert train["steps"] == 4 and train["report_to"] == ["tensorboard", "wandb"]


def killed_and_resumed(tmp_path, stop_after_step, sink):
    """A scripted run (mlxft.train.driver with no model) of 9 steps reporting every step, killed after
    step 6 (reports 1-5 written, the checkpoint at step 4), then resumed: reports 5-9 again."""
    cfg = config(tmp_path, "train.steps=9", "train.report_every=1", "train.checkpoint_every=4", f"train.report_to=[{sink}]")
    killed = Run.create(tmp_path / "run", cfg)
    stop_after_step(6)
    with pytest.raises(KeyboardInterrupt):
        fit(killed, cfg, Scripted())
    killed.reports.close(failed=True)  # as runs.start closes a run that failed
    killed.release()
    resumed = Run.open_for_resume(tmp_path / "run")
    fit(resumed, cfg, Scripted(), start=driver.Start(step=4))
    resumed.release()
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 10))
    return records


def test_a_resumed_run_replaces_its_tensorboard_points_after_the_checkpoint(tmp_path, stop_after_step):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    records = killed_and_resumed(tmp_path, stop_after_step, "tensorboard")
    same_curve(tensorboard_curve(tensorboard_run(tmp_path / "run"), "train/loss"), curve(records, "loss"), rel=1e-6)
    # the control: the files hold step 5 twice, the killed process's and the resumed one's
    files = sorted((tmp_path / "run" / "tensorboard").iterdir())
    steps = [event.step for path in files for event in EventFileLoader(str(path)).Load()
             if any(value.tag == "train/loss" for value in event.summary.value)]
    assert len(files) == 2 and steps == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9]


def test_a_resumed_run_reports_again_into_the_same_wandb_run(tmp_path, stop_after_step, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "elsewhere")
    records = killed_and_resumed(tmp_path, stop_after_step, "wandb")
    killed, resumed = wandb_runs(tmp_path / "run")
    loss = dict(curve(records, "loss"))
    for run_records, steps, exit_code in ((killed, [1, 2, 3, 4, 5], 1), (resumed, [5, 6, 7, 8, 9], 0)):
        assert wandb_curve(wandb_history(run_records), "train/loss") == [(step, loss[step]) for step in steps]
        (header,) = [r.run for r in run_records if r.WhichOneof("record_type") == "run"]
        assert (header.run_id, header.project) == ((tmp_path / "run" / "wandb" / "run-id").read_text().strip(), "elsewhere")
        assert [r.exit.exit_code for r in run_records if r.WhichOneof("record_type") == "exit"] == [exit_code]
