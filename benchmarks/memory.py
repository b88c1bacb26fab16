"""Training memory: mlxft's LoRA SFT step against mlx_lm.lora's on full-text rows, MLX's allocator
peak and tokens/s, with and without gradient checkpointing, in one run.

    python benchmarks/memory.py --model ~/.cache/mlxft-real/SmolLM2-135M-Instruct        # 4 x 1,020 tokens
    python benchmarks/memory.py --model M --length 256 --steps 2 --skip-peer

Both sides: the same {"text": ...} rows of --length tokens (the bundled news titles, one after
the other), every token scored; LoRA r 8 / alpha 16 / dropout 0 on q_proj and v_proj of every
layer, AdamW, batch --batch-size, float32 (the folder's dtype), MLX's CPU backend with mlxft's
OpenBLAS preload and one thread a side. Each side is its own process, one after the other.
- mlxft: `mlxft lora` from this checkout (the LM head in chunks, train.head_chunk's default),
  and with --before CHECKOUT the same command from another checkout (the commit before chunks);
- mlx-lm: its trainer through benchmarks/peers/run_mlx_lm.py, which reads mx.get_peak_memory().
Reported: the run's allocator peak (GB), tokens/s over the steps after the first (the first
compiles), and the last step's loss (the same rows and adapter initialisation do not make the
two tools' losses equal: mlx-lm draws its LoRA A otherwise).
Targets (issue 34), SmolLM2 at 4 x 1,024: with checkpointing at most 0.35x mlx_lm.lora's peak,
without at most 0.8x; tokens/s at least 0.95x of the checkout before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = common.ROOT


def text_rows(tokenizer, length: int, count: int) -> list[dict]:
    """`count` rows of about `length` tokens each, from the bundled news titles."""
    titles = [line.split("\t")[3] for line in (ROOT / "data" / "mind-sample" / "news.tsv").read_text().splitlines()]
    rows, k = [], 0
    for _ in range(count):
        words = []
        while len(tokenizer.encode(" ".join(words))) < length - 4:
            words.append(titles[k % len(titles)] + ".")
            k += 1
        ids = tokenizer.encode(" ".join(words))[: length - 4]
        rows.append({"text": tokenizer.decode(ids)})
    return rows


def mlxft_side(model: Path, data: Path, work: Path, env: dict, args, *, checkpoint: bool, before: Path | None = None) -> dict:
    out = work / f"mlxft-{'ckpt' if checkpoint else 'plain'}-{'before' if before else 'now'}"
    if before:  # that checkout's mlxft, not this one's (python -m imports from its working folder first)
        env = {**env, "PYTHONPATH": str(before.resolve())}
    where = before.resolve() if before else ROOT
    sets = {"lora.r": 8, "lora.alpha": 16, "lora.dropout": 0, "lora.target_modules": "[q_proj,v_proj]",
            "lora.full_finetune": "false", "train.batch_size": args.batch_size, "train.steps": args.steps,
            "train.warmup_steps": 0, "train.report_every": 1, "train.checkpoint_every": 10**6,
            "train.grad_checkpoint": str(checkpoint).lower(), "data.cutoff": args.length + 8,
            "data.split": "[1,0,0]", "data.packing": "false", "data.template": "plain", "eval.every": 0, "eval.generate_examples": 0}
    command = [sys.executable, "-m", "mlxft.cli", "lora", "--backend", "mlx", "--recipe", "alpaca-sft", "--model", str(model), "--data",
               str(data), "--out", str(out)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    common.run_side(f"mlxft {out.name}", command, env, work / f"{out.name}.log", cwd=where)
    if before and "head_chunk" in (out / "config.yaml").read_text():
        sys.exit(f"{out.name} ran this checkout's mlxft, not {before}'s")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_second" in r]
    later = steps[1:] or steps
    return {"peak_memory_gb": max(r["peak_memory_gb"] for r in steps),
            "tokens_per_second": sum(r["tokens_per_second"] for r in later) / len(later), "loss": steps[-1]["loss"]}


def mlx_lm_side(model: Path, data: Path, work: Path, env: dict, args, *, checkpoint: bool) -> dict:
    folder = work / "mlx-lm-data"
    folder.mkdir(exist_ok=True)
    rows = data.read_text()
    (folder / "train.jsonl").write_text(rows)
    (folder / "valid.jsonl").write_text("".join(rows.splitlines(keepends=True)[: args.batch_size]))
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    name = f"mlx-lm-{'ckpt' if checkpoint else 'plain'}"
    config = {
        "model": str(model), "train": True, "data": str(folder), "fine_tune_type": "lora", "num_layers": layers,
        "batch_size": args.batch_size, "iters": args.steps, "learning_rate": 3e-4, "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.0}}, "grad_checkpoint": checkpoint,
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
        "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 1, "save_every": 10**6,
        "max_seq_length": args.length + 8, "seed": 0, "adapter_path": str(work / f"{name}-adapters"),
    }
    (work / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
    result = work / f"{name}.json"
    common.run_side(name, [sys.executable, str(Path(__file__).parent / "peers" / "run_mlx_lm.py"), str(result), "--",
                           "-c", str(work / f"{name}.yaml")], env, work / f"{name}.log")
    steps = json.loads(result.read_text())["steps"]
    later = steps[1:] or steps
    return {"peak_memory_gb": max(s["peak_memory_gb"] for s in steps),
            "tokens_per_second": sum(s["counted_tokens"] / s["seconds"] for s in later) / len(later),
            "loss": steps[-1].get("loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder; else the SmolLM-135M-shaped random model of --vocab")
    parser.add_argument("--vocab", choices=tuple(common.VOCABULARIES), default="qwen",
                        help="without --model: the random model's vocabulary (qwen: 151,936 rows of LM head)")
    parser.add_argument("--length", type=int, default=1020)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--checkpointing", default="on,off", help="on, off or both (on,off)")
    parser.add_argument("--before", type=Path, help="another checkout of mlxft, run as the baseline")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = Path(args.model).expanduser() if args.model else common.benchmark_model(None, args.vocab)
    work = args.work or Path(tempfile.mkdtemp(prefix="mlxft-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    data.write_text("".join(json.dumps(r) + "\n" for r in text_rows(tokenizer, args.length, args.batch_size * args.steps)))
    env = common.side_environment(args.threads)
    results = {"model": str(model), "length": args.length, "batch_size": args.batch_size, "steps": args.steps,
               "threads": args.threads, "versions": common.versions("mlx", "mlx-lm"), "sides": {}}
    for setting in args.checkpointing.split(","):
        checkpoint = setting == "on"
        sides = results["sides"].setdefault(setting, {})
        if not args.skip_peer:
            sides["mlx_lm.lora"] = mlx_lm_side(model, data, work, env, args, checkpoint=checkpoint)
        if args.before:
            sides["mlxft before"] = mlxft_side(model, data, work, env, args, checkpoint=checkpoint, before=args.before)
        sides["mlxft"] = mlxft_side(model, data, work, env, args, checkpoint=checkpoint)
        print(f"\ngradient checkpointing {setting}, {args.batch_size} x {args.length} tokens:")
        peer = sides.get("mlx_lm.lora")
        for name, side in sides.items():
            ratio = f"  {side['peak_memory_gb'] / peer['peak_memory_gb']:.2f}x mlx_lm.lora's peak" if peer else ""
            print(f"  {name:18s} peak {side['peak_memory_gb']:.2f} GB  {side['tokens_per_second']:.1f} tok/s  "
                  f"loss {side['loss']}{ratio}")
        if args.before:
            print(f"  tokens/s against the checkout before: "
                  f"{sides['mlxft']['tokens_per_second'] / sides['mlxft before']['tokens_per_second']:.2f}x")
    print(f"\nwritten: {common.save(work, 'memory', results)}")


if __name__ == "__main__":
    subprocess.os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
