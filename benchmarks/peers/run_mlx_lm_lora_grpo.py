"""mlx-lm-lora's GRPO training, observed step by step: the peer side of grpo_mlx.py.

    pip install mlx-lm-lora          # a benchmark-only peer, not an mlxft dependency
    python benchmarks/peers/run_mlx_lm_lora_grpo.py RESULT_JSON -- <mlx_lm_lora.train arguments, e.g. -c config.yaml>

Runs what `mlx_lm_lora.train --train-mode grpo` runs (its argument handling and defaults, then
mlx_lm_lora.train.run: the model, its second full copy as the reference, its datasets and
train_grpo) with three changes that leave its work as it is:
- the reward function of the benchmark (peers/grpo_rewards.py) is put in its registry, as its
  @register_reward_function would;
- each row's prompt tokens are the ones mlxft rendered for the same row (the row's "prompt_ids"),
  so that both sides sample after the same prompts (its GRPODataset would add its own system
  prompt through the chat template);
- a TrainingCallback (its own hook) with steps_per_report=1 reads each step's time
  (1 / iterations_per_second), generated tokens and MLX peak memory.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import mlx_lm_lora.train as cli
    from mlx_lm_lora.trainer import datasets as peer_datasets
    from mlx_lm_lora.trainer.grpo_reward_functions import REWARD_REGISTRY
except ImportError:
    sys.exit('mlx-lm-lora is not installed; it is a benchmark-only peer: pip install mlx-lm-lora')
from grpo_rewards import varied
from mlx_lm.tuner.callbacks import TrainingCallback
from run_mlx_lm_lora_dpo import parse


class Recorder(TrainingCallback):
    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        self.reports.append({**info, "cpu": time.process_time()})


class SamePrompts(peer_datasets.GRPODataset):
    def __init__(self, data, tokenizer, **keys):
        super().__init__(data, tokenizer, **keys)
        self._data = [(list(row["prompt_ids"]), *rest) for row, (_, *rest) in zip(data, self._data)]


def main(result_path: str, argv: list[str]) -> None:
    args = parse(argv)
    REWARD_REGISTRY["varied"] = varied
    peer_datasets.GRPODataset = SamePrompts
    recorder = Recorder()
    cli.run(args, training_callback=recorder)

    steps = []
    for i, report in enumerate(recorder.reports):
        # CPU time between reports is the step's, except where the trainer validated first (the
        # first and the last iteration): none there.
        cpu = report["cpu"] - recorder.reports[i - 1]["cpu"] if 0 < i < len(recorder.reports) - 1 else None
        steps.append({"step": report["iteration"], "seconds": 1 / report["iterations_per_second"], "cpu_seconds": cpu,
                      "loss": report["train_loss"], "completions": args.batch_size * args.group_size,
                      "mean_completion_tokens": report["train_average_generated_tokens"],
                      "reward": report["train_total_rewards_mean"], "peak_memory_gb": report["peak_memory"]})
    Path(result_path).write_text(json.dumps({"steps": steps, "mlx_peak_memory_gb": mx.get_peak_memory() / 1e9}, indent=2))


if __name__ == "__main__":
    split = sys.argv.index("--")
    main(sys.argv[1], sys.argv[split + 1:])
