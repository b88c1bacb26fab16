"""mlx-lm-lora's DPO training, observed step by step: the peer side of dpo_mlx.py.

    pip install mlx-lm-lora          # a benchmark-only peer, not an mlxft dependency
    python benchmarks/peers/run_mlx_lm_lora_dpo.py RESULT_JSON -- <mlx_lm_lora.train arguments, e.g. -c config.yaml>

Runs what `mlx_lm_lora.train --train-mode dpo` runs (its argument handling and defaults, then
mlx_lm_lora.train.run: the model, its second full copy as the reference, its datasets and
train_dpo) with two observers, and one fix without which it stops on Linux:
- it calls mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]), a key only
  Metal's device_info has; on the CPU backend the call is given a limit of 0 (no wiring, which is
  all the call could do there);
- a TrainingCallback (its own hook) with steps_per_report=1 reads each step's time
  (1 / iterations_per_second), loss and MLX peak memory;
- the training set's CacheDataset notes the rows each step drew (its batch iterator sorts the
  whole set every step, then takes the batch's rows last), for the step's real and padded tokens.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import mlx.core as mx
import yaml

try:
    import mlx_lm_lora.train as cli
except ImportError:
    sys.exit('mlx-lm-lora is not installed; it is a benchmark-only peer: pip install mlx-lm-lora')
from mlx_lm.tuner.callbacks import TrainingCallback


class Recorder(TrainingCallback):
    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        train = RecordingDataset.made[0].handed_out
        self.reports.append({**info, "rows": train[-self.batch_size:], "cpu": time.process_time()})


class RecordingDataset(cli.CacheDataset):
    made = []

    def __init__(self, data):
        super().__init__(data)
        self.handed_out = []
        RecordingDataset.made.append(self)

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        self.handed_out.append((len(item["chosen"]), len(item["rejected"])))
        return item


def parse(argv: list[str]) -> types.SimpleNamespace:
    """As mlx_lm_lora.train.main: command line, then the -c YAML, then its CONFIG_DEFAULTS."""
    args = cli.build_parser().parse_args(argv)
    if args.config:
        with open(args.config) as f:
            for key, value in yaml.load(f, Loader=cli.yaml_loader).items():
                if getattr(args, key, None) is None:
                    setattr(args, key, value)
    for key, value in cli.CONFIG_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(result_path: str, argv: list[str]) -> None:
    args = parse(argv)
    if "max_recommended_working_set_size" not in mx.device_info():
        set_wired_limit = mx.set_wired_limit
        info = mx.device_info

        mx.device_info = lambda: {**info(), "max_recommended_working_set_size": 0}
        mx.set_wired_limit = lambda limit: set_wired_limit(limit) if limit else 0
    recorder = Recorder()
    recorder.batch_size = args.batch_size
    cli.CacheDataset = RecordingDataset  # run() wraps the train set first, then the validation set
    cli.run(args, training_callback=recorder)

    steps = []
    for i, report in enumerate(recorder.reports):
        # CPU time between reports is the step's, except where the trainer validated first (the
        # first and the last iteration): none there.
        cpu = report["cpu"] - recorder.reports[i - 1]["cpu"] if 0 < i < len(recorder.reports) - 1 else None
        lengths = [(min(c, args.max_seq_length), min(r, args.max_seq_length)) for c, r in report["rows"]]
        width = max(max(pair) for pair in lengths)  # chosen and rejected are padded to the longest of both
        seconds = 1 / report["iterations_per_second"]
        steps.append({"step": report["iteration"], "seconds": seconds, "cpu_seconds": cpu, "loss": report["train_loss"],
                      "tokens": sum(c + r for c, r in lengths), "padded_tokens": 2 * width * len(lengths), "width": width,
                      "supervised_tokens": round(report["tokens_per_second"] * seconds),
                      "peak_memory_gb": report["peak_memory"]})
    Path(result_path).write_text(json.dumps({"steps": steps}, indent=2))


if __name__ == "__main__":
    split = sys.argv.index("--")
    main(sys.argv[1], sys.argv[split + 1:])
