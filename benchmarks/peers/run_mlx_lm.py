"""mlx-lm's LoRA training, observed step by step: the peer side of lora_mlx.py.

    python benchmarks/peers/run_mlx_lm.py RESULT_JSON -- <mlx_lm.lora arguments, e.g. -c config.yaml>

Runs what `mlx_lm.lora --train` runs (its argument parsing and defaults, mlx_lm.utils.load,
mlx_lm.tuner.datasets.load_dataset, mlx_lm.lora.train_model, its compiled step and its
iterate_batches) with two observers and nothing else changed:
- a TrainingCallback (mlx-lm's own hook) with steps_per_report=1: each step's time
  (1 / iterations_per_second: its trainer times the step alone, validation excluded), the
  tokens it counted, the loss and MLX's peak memory. The CLI prints these rounded (tokens/s to
  an integer, trained tokens to 0.1k), too coarse to compare;
- the training set's CacheDataset records which rows each step drew, so the script knows each
  batch's real (non-padding) tokens and its padded shape, which mlx-lm does not report.
`mlx_lm.lora.run` would replace the callback with its reporting ones, so the few lines of run()
that matter are repeated here.
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import yaml
from mlx_lm import lora as cli
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.utils import load


class Recorder(TrainingCallback):
    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        self.reports.append({**info, "cpu": time.process_time()})


class RecordingDataset(CacheDataset):
    """mlx-lm's CacheDataset, noting the length of every row handed out, in order."""

    made = []

    def __init__(self, data):
        super().__init__(data)
        self.handed_out = []
        RecordingDataset.made.append(self)

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        self.handed_out.append(len(item[0]) if isinstance(item, tuple) else len(item))
        return item


def parse(argv: list[str]) -> types.SimpleNamespace:
    """As mlx_lm.lora.main: command line, then the -c YAML, then its CONFIG_DEFAULTS."""
    args = vars(cli.build_parser().parse_args(argv))
    if args.get("config"):
        with open(args["config"]) as f:
            for key, value in yaml.load(f, cli.yaml_loader).items():
                if args.get(key) is None:
                    args[key] = value
    for key, value in cli.CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    return types.SimpleNamespace(**args)


def main(result_path: str, argv: list[str]) -> None:
    args = parse(argv)
    np.random.seed(args.seed)  # as mlx_lm.lora.run
    model, tokenizer = load(args.model, tokenizer_config={"trust_remote_code": args.trust_remote_code},
                            trust_remote_code=args.trust_remote_code)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    recorder = Recorder()
    cli.CacheDataset = RecordingDataset  # train_model wraps the train set first, then the validation set
    cli.train_model(args, model, train_set, valid_set, training_callback=recorder)

    drawn = RecordingDataset.made[0].handed_out
    steps = []
    for i, report in enumerate(recorder.reports):
        # CPU time between reports is the step's, except where the trainer validated first (the
        # first and the last iteration): none there.
        cpu = report["cpu"] - recorder.reports[i - 1]["cpu"] if 0 < i < len(recorder.reports) - 1 else None
        lengths = [min(n, args.max_seq_length) for n in drawn[i * args.batch_size:(i + 1) * args.batch_size]]
        # iterate_batches pads to 1 + a multiple of 32, capped at max_seq_length
        width = min(1 + 32 * math.ceil(max(lengths) / 32), args.max_seq_length)
        seconds = 1 / report["iterations_per_second"]
        steps.append({"step": report["iteration"], "seconds": seconds, "cpu_seconds": cpu, "loss": report["train_loss"],
                      "tokens": sum(lengths), "padded_tokens": width * len(lengths), "width": width,
                      "counted_tokens": round(report["tokens_per_second"] * seconds),
                      "peak_memory_gb": report["peak_memory"]})
    Path(result_path).write_text(json.dumps({"steps": steps, "batch_size": args.batch_size}, indent=2))


if __name__ == "__main__":
    split = sys.argv.index("--")
    main(sys.argv[1], sys.argv[split + 1:])
