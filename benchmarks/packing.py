"""SFT packing (data.packing): the padding it saves on the bundled sets, and what it does to
training speed on MLX.

    python benchmarks/packing.py                         # padding on every SFT recipe + speed on alpaca-sft
    python benchmarks/packing.py --model ~/.cache/mlxft-real/SmolLM2-135M-Instruct --speed-steps 3

Padding: each SFT recipe's training rows, encoded with the model's tokenizer (the built-in one by
default), batched as the trainer batches them (length-grouped, the recipe's batch size, widths
rounded to MLX's PAD_MULTIPLE) one way, packed into rows of data.cutoff tokens the other.

Speed: `mlxft lora --recipe alpaca-sft --backend mlx` for --speed-steps steps, unpacked at the
recipe's batch size, then packed at batch sizes that give about the same tokens per step, into
rows of 512, 256 and 128 tokens (data.packing_length; the examples keep data.cutoff 512).
Trained tokens/s as the run reports it, one process
each, one after the other: compare within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: F401  (puts this checkout's mlxft first on the path)

from mlxft.backends.mlx import PAD_MULTIPLE
from mlxft.config import load_config
from mlxft.data.dataset import encode_split, load_splits
from mlxft.data.packing import pack, padding_fraction_of
from mlxft.models.files import load_tokenizer

SFT_RECIPES = ("tallrec", "tallrec-movie", "tallrec-book", "alpaca-sft", "product-desc")


def padding_table(model: str) -> list[dict]:
    tokenizer = load_tokenizer(model)
    rows = []
    for recipe in SFT_RECIPES:
        config = load_config(recipe, [])
        splits = load_splits(config.data)
        examples, _ = encode_split(splits.train, splits, tokenizer, config.data)
        lengths = [len(e) for e in examples]
        packed = pack(examples, config.data.cutoff)
        batch = config.train.batch_size
        rows.append({"recipe": recipe, "examples": len(examples), "mean_tokens": sum(lengths) / len(lengths),
                     "longest": max(lengths), "cutoff": config.data.cutoff, "packed_rows": len(packed),
                     "batch_size": batch,
                     "padding_unpacked": padding_fraction_of(lengths, batch, 0, PAD_MULTIPLE),
                     "padding_packed": padding_fraction_of([len(r) for r in packed], batch, 0, PAD_MULTIPLE),
                     "padding_unpacked_batch_1": padding_fraction_of(lengths, 1, 0, PAD_MULTIPLE)})
    return rows


def speed(model: str, steps: int, settings: list[tuple[str, list[str]]]) -> list[dict]:
    results = []
    for name, extra in settings:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "mlxft", "lora", "--recipe", "alpaca-sft", "--backend", "mlx", "--model", model,
                       "--out", out, "--set", f"train.steps={steps}", "--set", "eval.every=0", "--set", "data.max_valid_rows=4",
                       "--set", "eval.generate_examples=0", "--set", "train.checkpoint_every=100000", *extra]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
            summary = json.loads((Path(out) / "summary.json").read_text())
        results.append({"setting": name, "tokens_per_second": summary["tokens_per_second"],
                        "tokens_per_step": summary["trained_tokens"] / steps, "peak_memory_gb": summary["peak_memory_gb"]})
        print(f"  {name:<34} {results[-1]['tokens_per_second']:>9,.0f} tokens/s  "
              f"{results[-1]['tokens_per_step']:>7,.0f} tokens/step  peak {results[-1]['peak_memory_gb']:.2f} GB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--speed-steps", type=int, default=12, help="0: padding only")
    args = parser.parse_args()

    print(f"padding of one epoch's batches, tokenizer of {args.model}")
    print(f"  {'recipe':<14} {'examples':>8} {'mean':>6} {'longest':>7} {'cutoff':>6} {'packed rows':>11} "
          f"{'batch':>5} {'unpacked':>8} {'packed':>7} {'unpacked, batch 1':>17}")
    table = padding_table(args.model)
    for r in table:
        print(f"  {r['recipe']:<14} {r['examples']:>8} {r['mean_tokens']:>6.0f} {r['longest']:>7} {r['cutoff']:>6} "
              f"{r['packed_rows']:>11} {r['batch_size']:>5} {r['padding_unpacked']:>8.1%} {r['padding_packed']:>7.1%} "
              f"{r['padding_unpacked_batch_1']:>17.1%}")
    results = {"padding": table}
    if args.speed_steps:
        alpaca = next(r for r in table if r["recipe"] == "alpaca-sft")
        per_step = alpaca["batch_size"] * alpaca["mean_tokens"]
        settings = [(f"unpacked, batch {alpaca['batch_size']}", [])]
        for cutoff in (512, 256, 128):
            batch = max(1, round(per_step / cutoff))
            settings.append((f"packed into {cutoff}, batch {batch}",
                             ["--set", "data.packing=true", "--set", f"data.packing_length={cutoff}", "--set", f"train.batch_size={batch}"]))
        print(f"speed: alpaca-sft on MLX, {args.model}, {args.speed_steps} steps")
        results["speed"] = speed(args.model, args.speed_steps, settings)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
