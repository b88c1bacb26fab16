"""The run folder: one place per training run, readable by people and by `mlxft` itself.

    runs/tallrec-20261121-2130/
      config.yaml        the resolved configuration (recipe + --set), as run
      metrics.jsonl      one JSON object per report: step, loss, learning_rate, ... and eval_*
      summary.json       final and best metrics, AUC before and after, tokens/s, peak memory
      best/  last/       adapters in the PEFT layout (or full models, for full fine-tuning)
      checkpoint/        adapter + optimizer state + step + RNG state, for --resume

Everything is written under a temporary name and renamed, so a killed run leaves the previous
complete file or folder, never half of one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlxft.config import RunConfig, dump_config
from mlxft.errors import UserError
from mlxft.files import write_atomic


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


class Run:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def create(cls, folder: Path, config: RunConfig) -> Run:
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"run folder {folder} is not empty; use --resume {folder} to continue it, or another --out")
        folder.mkdir(parents=True, exist_ok=True)
        run = cls(folder)
        write_atomic(run.folder / "config.yaml", dump_config(config))
        return run

    @classmethod
    def open_for_resume(cls, folder: Path) -> Run:
        folder = Path(folder)
        if not (folder / "config.yaml").exists():
            raise UserError(f"--resume {folder}: not a run folder (no config.yaml)")
        if not (folder / "checkpoint" / "state.json").exists():
            raise UserError(f"--resume {folder}: no checkpoint yet; start the run again instead")
        return cls(folder)

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / "checkpoint"

    def log(self, record: dict) -> None:
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, after_step: int) -> None:
        """On resume, drop reports written after the checkpoint: they will be written again."""
        path = self.folder / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= after_step]
        write_atomic(path, "".join(line + "\n" for line in kept))

    def metrics(self) -> list[dict]:
        path = self.folder / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.folder / "summary.json", json.dumps(summary, indent=2))
