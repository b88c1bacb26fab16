"""`--report-to tensorboard,wandb`: every report of a run, as metrics.jsonl holds it
(mlxft.train.runs.Run.log), also goes where people look at training curves.

    mlxft lora --recipe tallrec --report-to tensorboard     # then: tensorboard --logdir runs

Names: a record's `step` is the x axis; `eval_X` is shown as `eval/X` and every other number as
`train/X` (the names of transformers' Trainer, so train/loss and eval/loss are where TRL users
look); non-numbers are skipped. The run's config.yaml goes along once: TensorBoard's text and
hparams tabs, W&B's run config.

Where: TensorBoard event files in RUN/tensorboard/. W&B: wandb.init(dir=RUN), so its files are in
RUN/wandb/; project $WANDB_PROJECT or "mlxft"; the run folder's name is the run's name; WANDB_MODE
applies as wandb reads it (offline: nothing leaves the machine).

Resume: the reports after the checkpoint are written again (Run.truncate_log). TensorBoard gets a
restart marker (a SessionLog START) at the first of them, from which on it drops the earlier
file's points. W&B resumes the same run (its id is kept in RUN/wandb/run-id); W&B's history only
grows, so those steps appear twice there, with the same losses (a resumed run repeats them exactly).

A sink opens at the run's first report (or a resume's truncation), so that a run stopped by a
mistake before it leaves no W&B run behind; the packages are optional extras, checked before a
model loads (check_installed). Only the process that writes the run folder reports (rank 0).
"""

from __future__ import annotations

import importlib
import json
import numbers
import os
import secrets
import string
import time
from pathlib import Path

import yaml

from mlxft.errors import UserError
from mlxft.files import write_atomic

REPORT_TO = ("tensorboard", "wandb")

# What each sink imports; its pip extra has the sink's name.
MODULES = {"tensorboard": "tensorboard.summary.writer.event_file_writer", "wandb": "wandb"}


def parse_names(text: str) -> list[str]:
    """`--report-to` as typed: one name, a comma list, or none."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if names == ["none"]:
        return []
    if not names or any(name not in REPORT_TO for name in names):
        raise UserError(f"--report-to {text!r}: choose {', '.join(REPORT_TO)}, a comma list of them, or none")
    return names


def check_installed(names: list[str]) -> None:
    """Each sink's package imports; said in one line with the extra that brings it, before a model loads."""
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            raise UserError(f"--report-to {name} needs the {name} package: pip install 'mlxft[{name}]'") from None


def metric_name(key: str) -> str:
    """A record's key as the sinks show it: eval_loss -> eval/loss, loss -> train/loss."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def scalars(record: dict) -> dict:
    """The numbers of a report under their shown names; the step is the x axis, not a curve."""
    return {metric_name(key): value for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)}


def flat(config: dict, prefix: str = "") -> dict:
    """Nested settings as {"train.learning_rate": 3e-4, ...}: TensorBoard's hparams take one level
    of numbers, booleans and text (a list becomes its JSON text; an unset one is left out)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = json.dumps(value)
    return out


class TensorBoard:
    """Event files in RUN/tensorboard/, one per process that reported (TensorBoard reads them in order)."""

    def __init__(self, folder: Path, config_text: str, resumed_after: int | None):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.event_pb2 = event_pb2
        self.writer = EventFileWriter(str(folder / "tensorboard"))
        if resumed_after is None:
            self.write_config(config_text)
        else:  # TensorBoard keeps the earlier points before this step and drops those from it on
            self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=resumed_after + 1,
                                                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self.writer.flush()

    def write_config(self, config_text: str) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from tensorboard.plugins.text.summary_v2 import text_pb

        # Indented, the YAML shows as a code block in the text tab (it renders markdown).
        shown = "\n".join("    " + line for line in config_text.splitlines())
        summary = summary_pb2.Summary(value=[*text_pb("config", shown).value,
                                             *hparams_pb(flat(yaml.safe_load(config_text) or {})).value])
        self.writer.add_event(self.event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

    def log(self, step: int, values: dict) -> None:
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                             for tag, value in values.items()])
        self.writer.add_event(self.event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()  # a killed run keeps what it reported, as metrics.jsonl does

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB:
    """One W&B run per run folder, resumed under the id kept in RUN/wandb/run-id."""

    def __init__(self, folder: Path, config_text: str, resumed_after: int | None):
        import wandb

        id_file = folder / "wandb" / "run-id"
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            write_atomic(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "mlxft", name=folder.name, dir=str(folder),
                              id=run_id, resume="allow", config=yaml.safe_load(config_text) or {})
        # The run's own step is the x axis (W&B's internal step only counts calls; it cannot go
        # back when a resumed run reports a step again), as transformers' WandbCallback does.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, step: int, values: dict) -> None:
        self.run.log({**values, "train/global_step": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


SINKS = {"tensorboard": TensorBoard, "wandb": WandB}


class Reports:
    """The sinks a run reports to besides metrics.jsonl; none by default (then nothing is imported)."""

    def __init__(self, names: list[str] = (), folder: Path | None = None):
        self.names, self.folder = list(names), folder
        self.sinks: list | None = None  # opened at first use
        self.resumed_after: int | None = None

    def open(self) -> list:
        if self.sinks is None:
            # config.yaml as the run runs it (a resume may have changed its memory settings)
            config_text = (self.folder / "config.yaml").read_text() if self.names else ""
            self.sinks = [SINKS[name](self.folder, config_text, self.resumed_after) for name in self.names]
        return self.sinks

    def truncate(self, after_step: int) -> None:
        """A resumed run reports the steps after `after_step` again."""
        if self.names:
            self.resumed_after = after_step
            self.open()

    def log(self, record: dict) -> None:
        if self.names:
            values = scalars(record)
            for sink in self.open():
                sink.log(record["step"], values)

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks or []:
            sink.close(failed)
        self.sinks, self.names = None, []  # closed for good: a later report writes metrics.jsonl only
