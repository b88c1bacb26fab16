"""The run folder: one place per training run, readable by people and by `mlxft` itself.

    runs/tallrec-20261121-2130/
      config.yaml        the resolved configuration (recipe + --set), as run; --resume runs it again
      metrics.jsonl      one JSON object per report: step, loss, learning_rate, ... and eval_*
      tensorboard/ wandb/  the same reports, with train.report_to (mlxft.train.report_to)
      summary.json       final and best metrics, AUC before and after, tokens/s, peak memory
      best/  last/       adapters in the PEFT layout (or full models, for full fine-tuning)
      checkpoint/        adapter + optimizer state + step, for --resume
      .lock              held (an exclusive lock) by the one process running in this folder

Everything is written under a temporary name and renamed, so a killed run leaves the previous
complete file or folder, never half of one; resuming deletes what a kill left half-written.
One process at a time: a second run on the same folder stops with a one-line error.

    with runs.start(config, resume=None) as (config, run):   # create, or resume, and hold it
        trainer.train(config, run, resume=run.resumed)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from mlxft.config import RunConfig, dump_config, load_run_config
from mlxft.errors import UserError
from mlxft.files import recover_staged, write_atomic
from mlxft.train.report_to import Reports, check_installed

LOCK = ".lock"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


def default_run_dir(recipe: str, world=None) -> Path:
    """runs/<recipe>-<date>-<time>: rank 0's time on every rank of a distributed run."""
    now = int(time.time())
    if world is not None and world.size > 1:  # whole seconds, in two parts that float32 holds exactly
        high, low = world.all_sum([now // 4096, now % 4096] if world.main else [0, 0])
        now = int(high) * 4096 + int(low)
    return Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


class Run:
    def __init__(self, folder: Path, lock: int | None = None, *, made: bool = False, resumed: bool = False):
        self.folder = Path(folder)
        self.resumed = resumed
        self._lock = lock
        self._made = made  # this process created the folder itself (so it may remove it)
        self.reports = Reports()  # where reports go besides metrics.jsonl; only the writing rank has any

    @classmethod
    def create(cls, folder: Path, config: RunConfig) -> Run:
        """A new run in `folder` (made if need be; an empty one is fine), locked for this process."""
        folder = Path(folder)
        check_installed(config.train.report_to)  # before anything is made
        if folder.exists() and not folder.is_dir():
            raise UserError(f"run folder {folder}: is a file, not a folder; choose another --out")
        made = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run folder {folder}: cannot create it ({e.strerror or e})") from None
        lock = _acquire(folder)
        if any(entry.name != LOCK for entry in folder.iterdir()):
            os.close(lock)
            raise UserError(f"run folder {folder} is not empty; use --resume {folder} to continue it, or another --out")
        run = cls(folder, lock, made=made)
        write_atomic(folder / CONFIG, dump_config(config))
        run.reports = Reports(config.train.report_to, folder)
        return run

    @classmethod
    def open_for_resume(cls, folder: Path) -> Run:
        """A stopped run, locked for this process, with what a kill left half-written cleaned up."""
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"--resume {folder}: no such run folder")
        if not (folder / CONFIG).is_file():
            raise UserError(f"--resume {folder}: not a run folder (no {CONFIG})")
        run = cls(folder, _acquire(folder), resumed=True)
        recover_staged(folder)
        if not (run.checkpoint_dir / "state.json").exists():
            run.release()
            raise UserError(f"--resume {folder}: no checkpoint yet; start the run again instead")
        try:
            run.checkpoint_state()  # a damaged one is named now, before a model loads
            report_to = run.config().train.report_to
            check_installed(report_to)
        except UserError:
            run.release()
            raise
        run.reports = Reports(report_to, folder)
        return run

    def config(self, overrides: list[str] = ()) -> RunConfig:
        """The config the run was started with, exactly (see config.load_run_config); with
        `overrides` (config.RESUME_SETTINGS only) those changed."""
        return load_run_config(self.folder / CONFIG, overrides)

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / "checkpoint"

    def checkpoint_state(self) -> dict:
        """checkpoint/state.json: step, best, stale and the backend that wrote it, checked."""
        path = self.checkpoint_dir / "state.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"--resume {self.folder}: {path} is damaged ({getattr(e, 'msg', e)}); "
                            "the run cannot continue from it") from None
        progress = state.get("progress") if isinstance(state, dict) else None
        valid = (isinstance(state, dict) and _count(state.get("step")) and _count(state.get("stale"))
                 and (progress is None or (isinstance(progress, dict) and _count(progress.get("trained_tokens"))
                                           and (progress.get("window_sums") is None
                                                or (isinstance(progress["window_sums"], list)
                                                    and all(isinstance(v, (int, float)) for v in progress["window_sums"])))))
                 and (state.get("best") is None or isinstance(state.get("best"), dict))
                 and state.get("backend", "mlx") in ("mlx", "torch"))
        if not valid:
            raise UserError(f"--resume {self.folder}: {path} is damaged (it needs step, best, stale and backend); "
                            "the run cannot continue from it")
        return {"backend": "mlx", **state}  # checkpoints written before backends were named are MLX's

    def log(self, record: dict) -> None:
        with open(self.folder / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.reports.log(record)

    def truncate_log(self, after_step: int) -> None:
        """On resume, drop reports written after the checkpoint: they will be written again."""
        self.reports.truncate(after_step)
        if not (self.folder / METRICS).exists():
            return
        kept = [record for record in self.metrics() if record.get("step", 0) <= after_step]
        write_atomic(self.folder / METRICS, "".join(json.dumps(record) + "\n" for record in kept))

    def metrics(self) -> list[dict]:
        """Every report; a last line cut short by a kill is dropped (it is written again on resume)."""
        path = self.folder / METRICS
        if not path.exists():
            return []
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                if number == len(lines):
                    break  # torn by a kill mid-write
                raise UserError(f"{path}:{number}: damaged report (not a JSON object)")
            records.append(record)
        return records

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.folder / "summary.json", json.dumps(summary, indent=2))

    def trained(self) -> bool:
        """Whether anything worth keeping was written: a report or a checkpoint."""
        return (self.folder / METRICS).exists() or self.checkpoint_dir.exists()

    def discard(self) -> None:
        """Remove what this new run wrote (it trained nothing); a folder it found empty stays, empty."""
        if self._made:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        for entry in self.folder.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    def release(self) -> None:
        """Close the report sinks and free the folder."""
        self.reports.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


@contextmanager
def start(config: RunConfig | None, resume: str | Path | None = None, world=None, resume_overrides: list[str] = ()):
    """(config, run) for a new run of `config`, or for resuming the run in `resume` with the config
    it was started with (`resume_overrides` may change its config.RESUME_SETTINGS). The folder is held for the block; when the block fails before anything was
    trained, a new run's folder is removed, so a mistake leaves no half-made run behind.

    With several ranks (mlxft.train.distributed.World) rank 0 creates or opens and holds the folder; the
    others get a Run that reads it (config, checkpoint) once rank 0 has it ready, and write nothing."""
    main = world is None or world.main
    if resume is None:
        folder = Path(config.out) if config.out else default_run_dir(config.recipe, world)
        config.out = str(folder)
    if main:
        run = Run.open_for_resume(Path(resume)) if resume is not None else Run.create(folder, config)
    if world is not None and world.size > 1:
        world.barrier()  # the folder is ready (created, or cleaned up for resuming) before the others read it
    if not main:
        run = Run(Path(resume) if resume is not None else folder, resumed=resume is not None)
    if resume is not None:
        config = run.config(resume_overrides)
        if resume_overrides and main:  # what it runs with now, for the next resume too
            write_atomic(run.folder / CONFIG, dump_config(config))
    try:
        yield config, run
    except BaseException:
        run.reports.close(failed=True)  # W&B marks the run failed; closed before a discard deletes their files
        if main and not run.resumed and not run.trained():
            run.discard()
        raise
    finally:
        run.release()


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _acquire(folder: Path) -> int:
    """An exclusive lock on folder/.lock, held until released or the process ends (a killed run
    frees it). POSIX record locks belong to the process, so a run resumed in the process that was
    running it (tests do this) is not refused."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"run folder {folder}: cannot write in it ({e.strerror or e})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"run folder {folder} is in use by another mlxft run; wait for it to finish, "
                        "or choose another --out") from None
    return fd
