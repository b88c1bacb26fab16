"""Shared by the peer benchmarks: the model, the rows, running a side in its own process, and the
ratio table.

The model is a Llama with SmolLM-135M's shape (576 wide, 30 layers, 9 query / 3 key-value heads,
MLP 1536, tied embeddings) and random weights, written by mlxft.models.builtin.write_model next to the
built-in tokenizer (so its vocabulary is that tokenizer's 2,048 pieces, not SmolLM's 49,152: the
blocks are SmolLM's, the embedding is smaller). The rows are the training split of the bundled
TALLRec sample (data/mind-sample through the tallrec recipe's conversion and split).

Every side runs in a process of its own, with the same thread count in OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS and MKL_NUM_THREADS (and torch.set_num_threads where torch runs), and MLX sides
with the BLAS preload mlxft uses. Sides run back to back; ratios are mlxft / peer from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the mlxft of this checkout, wherever the script is run from

SMOLLM_135M_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
}
SMOLLM_VOCAB = 49152
VOCABULARIES = {"smollm": SMOLLM_VOCAB, "qwen": 151_936}  # --vocab: rows of the built model's embedding and LM head
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def arguments(description: str, steps: int = 5, warmup: int = 2, batch_size: int = 4) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help=f"timed steps per side (default {steps})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps first (default {warmup})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"rows (DPO: pairs) per step (default {batch_size})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every side (default: all cores)")
    parser.add_argument("--model", default=None, help="model folder (default: the SmolLM-135M-shaped random Llama, built once)")
    parser.add_argument("--vocab", choices=("tokenizer", *VOCABULARIES), default="tokenizer",
                        help="the built model's vocabulary: the built-in tokenizer's 2,048 (107M parameters, default) or "
                             "SmolLM-135M's 49,152 (134.5M; ids past the tokenizer's are never input, but the LM head "
                             "scores them all, as SmolLM's does), or qwen: Qwen2.5's 151,936")
    parser.add_argument("--pad-multiple", type=int, default=None,
                        help="mlxft's batch padding multiple (default: its trainers' 16)")
    parser.add_argument("--work", type=Path, default=None, help="folder for data, logs and results (default: a new one under /tmp)")
    return parser


def work_folder(given: Path | None, name: str) -> Path:
    folder = given or Path("/tmp") / f"mlxft-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def benchmark_model(given: str | None = None, vocab: str = "tokenizer") -> Path:
    """The SmolLM-135M-shaped random Llama, built once into mlxft's cache: with the built-in
    tokenizer's vocabulary (mlxft.models.builtin.write_model), or with SmolLM-135M's 49,152 rows of
    embedding and LM head (the same config and initialisation, numbered past the tokenizer)."""
    if given:
        return Path(given)
    from mlxft.models.builtin import ensure_builtin, initial_weights, model_config, write_model
    from mlxft.models.cache import cache_root
    from mlxft.models.files import TOKENIZER_OUTPUTS

    name = "smollm-135m-shape-random" if vocab == "tokenizer" else f"smollm-135m-shape-{VOCABULARIES[vocab]}-vocab-random"
    folder = cache_root() / "benchmarks" / name
    if (folder / "model.safetensors").exists():
        return folder
    staging = folder.with_name(folder.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = ensure_builtin()
    for file in TOKENIZER_OUTPUTS:
        if (tokenizer / file).exists():
            shutil.copy(tokenizer / file, staging / file)
    print(f"writing the SmolLM-135M-shaped random model once: {folder}", flush=True)
    if vocab == "tokenizer":
        write_model(staging, SMOLLM_135M_SHAPE, seed=0)
    else:
        from safetensors.numpy import save_file

        config = model_config(VOCABULARIES[vocab], SMOLLM_135M_SHAPE)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        save_file(initial_weights(config, seed=0), str(staging / "model.safetensors"), metadata={"format": "pt"})
    staging.rename(folder)
    return folder


def tallrec_training_rows(max_history: int | None = 10) -> list[dict]:
    """The tallrec recipe's training rows of the bundled MIND sample, rendered with its template:
    [{'prompt': ..., 'completion': ...}], the same text every side tokenizes."""
    from mlxft.config import load_config
    from mlxft.data.dataset import load_splits
    from mlxft.data.templates import render

    config = load_config("tallrec", [f"data.max_history={max_history}"])
    splits = load_splits(config.data)
    rows = []
    for record in splits.train:
        prompted = render(record, splits.schema, splits.template)
        rows.append({"prompt": prompted.prompt, "completion": prompted.completion})
    return rows


def side_environment(threads: int | None, fast_blas: bool = True) -> dict:
    """The environment of one side: thread counts (None: none set, and mlxft's own choice,
    mlxft.cpu_share's auto), this checkout importable, and for MLX sides the BLAS preload that
    the `mlxft` command would use (or none, for the stock wheel)."""
    if threads is None:
        env = {name: value for name, value in os.environ.items() if name not in THREAD_VARIABLES}
        env["MLXFT_CPU_THREADS"] = "auto"
    else:
        env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MLXFT_BLAS_ACTIVE", None)
    env.pop("LD_PRELOAD", None)
    if fast_blas:
        from mlxft.blas import ensure_shim

        shim, why = ensure_shim()
        if shim is None:
            sys.exit(f"the OpenBLAS shim is not available ({why}); the MLX sides would run on the stock BLAS")
        env["LD_PRELOAD"] = str(shim)
        env["MLXFT_BLAS_ACTIVE"] = str(shim)  # an `mlxft` child then knows it already has it
        env.pop("MLXFT_BLAS", None)
    else:
        env["MLXFT_BLAS"] = "stock"
    return env


def run_side(name: str, command: list[str], env: dict, log: Path, cwd: Path = ROOT) -> dict:
    """Run one side to completion, in `cwd` (`python -m` imports from there first); returns
    {'seconds', 'peak_rss_gb'} of its process (from wait4)."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        sys.exit(f"{name} failed (exit {process.returncode}); the end of {log}:\n{tail}")
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def hf_peer_side(name: str, script: str, data: Path, model: Path, args, env: dict, work: Path, tag: str) -> dict:
    """A transformers-based peer (benchmarks/peers/SCRIPT on DATA, the same flags for each), summarized as
    the comparison table reads it. Its result and log go to WORK/TAG-result.json and WORK/TAG.log."""
    result = work / f"{tag}-result.json"
    process = run_side(name, [
        sys.executable, str(ROOT / "benchmarks" / "peers" / script), str(data), str(result),
        "--model", str(model), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads)], env, work / f"{tag}.log")
    measured = json.loads(result.read_text())
    return {**summarize_steps(measured["steps"]), "peak_memory_gb": measured["peak_rss_gb"],
            "process_peak_rss_gb": process["peak_rss_gb"], "threads": measured["threads"], "steps": measured["steps"]}


def mlxft_bench(workload: str, backend: str, model: Path, args, work: Path, env: dict, extra: list[str] = ()) -> dict:
    """`mlxft bench` on one backend; returns its table row plus the per-step records."""
    out = work / f"mlxft-{workload}-{backend}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "mlxft", "bench", "--workload", workload, "--backends", backend,
               "--model", str(model), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--out", str(out),
               "--set", "lora.dropout=0.0", *extra]
    if getattr(args, "pad_multiple", None):
        command += ["--pad-multiple", str(args.pad_multiple)]
    process = run_side(f"mlxft {workload} ({backend})", command, env, work / f"mlxft-{workload}-{backend}.log")
    report = json.loads((out / "bench.json").read_text())
    (row,) = report["rows"]
    if not row["available"]:
        sys.exit(f"mlxft {backend}: not available: {row['reason']}")
    return {**row, "steps": report["results"][backend]["steps"], "process_peak_rss_gb": process["peak_rss_gb"],
            "peak_gemm_gflops": report["peak_gemm_gflops"], "mlx_blas": report["mlx_blas"],
            "shape_warmup_seconds": report["results"][backend].get("shape_warmup_seconds")}


def summarize_steps(steps: list[dict]) -> dict:
    """Processed / supervised tokens per second and the median step over the timed steps."""
    import statistics

    timed = [s for s in steps if s["timed"]]
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    padded = sum(s["padded_tokens"] for s in timed)
    summary = {"tokens_per_second": tokens / seconds,
               "supervised_tokens_per_second": sum(s["supervised_tokens"] for s in timed) / seconds,
               "median_step_seconds": statistics.median(s["seconds"] for s in timed),
               "padding_fraction": 1 - tokens / padded, "timed_steps": len(timed), "timed_seconds": seconds}
    # CPU time (all the process's threads) of the steps that have it: with one thread a side, the
    # measure a shared host disturbs least (waiting for a core is not counted).
    with_cpu = [s for s in timed if s.get("cpu_seconds") is not None]
    if with_cpu:
        summary["tokens_per_cpu_second"] = sum(s["tokens"] for s in with_cpu) / sum(s["cpu_seconds"] for s in with_cpu)
    return summary


def compiled_peer_summary(steps: list[dict], warmup: int) -> dict:
    """For a peer that compiles its step once per batch shape (mlx-lm, mlx-lm-lora): its steps
    are marked timed (after the warm-up) and new_shape (the first step with its "width"), and
    summarized twice: over every timed step, and over the "steady" timed steps whose shape an
    earlier step had (no compilation inside: the state of a long run, which is what mlxft's bench
    measures after tracing every shape first). The steady figures lead when there are at least 2
    such steps; otherwise all timed steps do, and the reader is told."""
    seen = set()
    for i, step in enumerate(steps):
        step["timed"] = i >= warmup
        step["new_shape"] = step["width"] not in seen
        seen.add(step["width"])
    every = summarize_steps(steps)
    steady = [s for s in steps if s["timed"] and not s["new_shape"]]
    side = {**{f"all_{k}": v for k, v in every.items()}, "steady_steps": len(steady), "distinct_shapes": len(seen)}
    if len(steady) >= 2:
        side.update(summarize_steps([{**s, "timed": True} for s in steady]), basis="steady timed steps")
    else:
        side.update(every, basis="all timed steps (fewer than 2 steady ones: run more --steps)")
    side["padding_fraction"] = every["padding_fraction"]
    return side


def versions(*packages: str) -> dict:
    from importlib import metadata

    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def print_comparison(title: str, sides: dict[str, dict], ours: str, theirs: str, keys: list[tuple[str, str]],
                     targets: dict[str, float] | None = None) -> dict:
    """A table of both sides and the mlxft / peer ratio of each number; returns the ratios."""
    print(f"\n{title}")
    width = max(len(label) for label, _ in keys)
    print(f"{'':{width}}  {ours:>14}  {theirs:>14}  {'ratio':>7}")
    ratios = {}
    for label, key in keys:
        a, b = sides[ours].get(key), sides[theirs].get(key)
        ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        ratios[key] = ratio
        target = (targets or {}).get(key)
        verdict = "" if target is None or ratio is None else f"  (target {target:g}x: {'met' if ratio >= target else 'MISSED'})"
        print(f"{label:{width}}  {_fmt(a):>14}  {_fmt(b):>14}  {_fmt(ratio, 2) + 'x' if ratio else '-':>7}{verdict}")
    return ratios


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def save(work: Path, name: str, data: dict) -> Path:
    path = work / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"\nall numbers: {path}")
    return path
