"""The run folder as a hostile world treats it: two runs at once, kills mid-write, damaged files,
a umask, a failure before the first step."""

import json
import os
import signal
import subprocess
import sys

import pytest

from mlxft.config import load_config
from mlxft.errors import UserError
from mlxft.files import staged_folder, write_atomic
from mlxft.train import runs
from mlxft.train.runs import Run


def config(out):
    return load_config("tallrec", ["train.steps=4", f"out={out}"])


HOLD = """
import sys, time
from mlxft.config import load_config
from mlxft.train.runs import Run
run = Run.create(sys.argv[1], load_config("tallrec"))
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(UserError, match="is in use by another mlxft run"):
            Run.create(folder, config(folder))
        (folder / "checkpoint").mkdir()
        (folder / "checkpoint" / "state.json").write_text(json.dumps({"step": 1, "best": None, "stale": 0}))
        with pytest.raises(UserError, match="is in use by another mlxft run"):
            Run.open_for_resume(folder)
        assert (folder / "config.yaml").exists()  # the refused runs deleted nothing of the first one's
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # a killed run frees its folder: it can be resumed (and a new run there is still refused)
    Run.open_for_resume(folder).release()
    with pytest.raises(UserError, match="is not empty; use --resume"):
        Run.create(folder, config(folder))


def test_out_naming_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        Run.create(tmp_path / "file", config(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


def test_a_failure_before_training_leaves_no_run_folder(tmp_path):
    with pytest.raises(RuntimeError), runs.start(config(tmp_path / "new")) as (_, run):
        assert run.folder.exists()
        raise RuntimeError("an encoding error, say")  # not only UserErrors: any failure
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError), runs.start(config(tmp_path / "empty")):
        raise UserError("bad row")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    # once a report is written the run is kept, for --resume
    with pytest.raises(KeyboardInterrupt), runs.start(config(tmp_path / "trained")) as (_, run):
        run.log({"step": 1, "loss": 1.0})
        raise KeyboardInterrupt
    assert (tmp_path / "trained" / "metrics.jsonl").exists()


def make_stopped_run(folder, step=2):
    with pytest.raises(KeyboardInterrupt), runs.start(config(folder)) as (_, run):
        for s in range(1, step + 1):
            run.log({"step": s, "loss": 1.0 / s})
        with staged_folder(run.checkpoint_dir) as staging:
            (staging / "state.json").write_text(json.dumps({"step": step, "best": None, "stale": 0, "backend": "mlx"}))
        raise KeyboardInterrupt
    return folder


def test_a_torn_last_report_is_dropped_and_a_damaged_one_named(tmp_path):
    folder = make_stopped_run(tmp_path / "run")
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # what a kill mid-write leaves
    run = Run.open_for_resume(folder)
    assert [r["step"] for r in run.metrics()] == [1, 2]
    run.truncate_log(2)
    assert (folder / "metrics.jsonl").read_text().count("\n") == 2 and run.metrics()[-1]["step"] == 2
    run.release()
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join(["garbage", *lines]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:1: damaged report"):
        Run(folder).metrics()


@pytest.mark.parametrize("state", ["{\"step\": 2, \"be", "[1, 2]", '{"step": -1, "best": null, "stale": 0}',
                                   '{"step": 2, "best": 5, "stale": 0}', '{"step": 2, "best": null, "stale": 0, "backend": "jax"}'])
def test_a_damaged_checkpoint_state_is_a_one_line_error(tmp_path, state):
    folder = make_stopped_run(tmp_path / "run")
    (folder / "checkpoint" / "state.json").write_text(state)
    with pytest.raises(UserError, match=r"checkpoint/state.json is damaged"):
        Run.open_for_resume(folder)


def test_resume_names_what_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        Run.open_for_resume(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=r"not a run folder \(no config.yaml\)"):
        Run.open_for_resume(tmp_path / "plain")


def test_resume_cleans_what_a_kill_mid_checkpoint_left(tmp_path):
    folder = make_stopped_run(tmp_path / "run")
    leftovers = [folder / ".checkpoint.k3j_x9a2", folder / ".best.0abcdefg"]
    for staging in leftovers:
        staging.mkdir()
        (staging / "optimizer.safetensors").write_bytes(b"\0" * 1000)
    (folder / ".metrics.jsonl.ab12cd34.tmp").write_text('{"step": 1}\n')
    Run.open_for_resume(folder).release()
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "checkpoint", "config.yaml", "metrics.jsonl"]


def test_a_kill_between_the_two_renames_of_a_checkpoint_keeps_the_old_one(tmp_path):
    folder = make_stopped_run(tmp_path / "run")
    os.rename(folder / "checkpoint", folder / ".checkpoint.old")  # the old one moved aside ...
    (folder / ".checkpoint.zz9y8x7w").mkdir()  # ... and the new one never moved in
    run = Run.open_for_resume(folder)
    assert run.checkpoint_state()["step"] == 2
    assert not (folder / ".checkpoint.old").exists() and not (folder / ".checkpoint.zz9y8x7w").exists()


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_run_files_get_the_users_umask(tmp_path, mask, file_mode, folder_mode):
    old = os.umask(mask)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        with staged_folder(tmp_path / "adapter") as staging:
            (staging / "x").write_text("x")
        with runs.start(config(tmp_path / "run")) as (_, run):
            run.write_summary({})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == folder_mode
    for name in ("config.yaml", "summary.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == file_mode, name
    assert (tmp_path / "run").stat().st_mode & 0o777 == folder_mode
