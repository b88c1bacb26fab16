"""`mlxft bench`: one workload, several backends, side by side.

    mlxft bench --workload lora --backends mlx,torch --steps 10 --warmup 2
    mlxft bench --workload dpo --backends mlx --model path/to/model --set train.batch_size=2

The workload (config, batches, starting adapter) is built once in this process; each backend
then runs it in a child process (mlxft.bench.child) with the same thread count, and reports
every step. Warm-up steps (compilation, first allocations) run but are not timed. Per backend:
processed (non-padding) tokens/s, supervised tokens/s, the median step time, peak memory, the
loss at the last step (same weights and batches on every backend: the losses must agree), the
padding fraction and the share of the host's peak GEMM rate (model FLOPs per mlxft.bench.flops
over the fastest 1024³ product any side measured). Writes bench.json and bench.png in --out.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlxft.bench import flops
from mlxft.bench import workload as workloads
from mlxft.errors import UserError

BACKEND_NAMES = ("mlx", "torch")


def parse_backends(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown or not names:
        raise UserError(f"--backends takes a comma-separated list of {', '.join(BACKEND_NAMES)}; got {text!r}")
    return list(dict.fromkeys(names))


def default_out(workload: str) -> Path:
    return Path("runs") / f"bench-{workload}-{time.strftime('%Y%m%d-%H%M%S')}"


def bench(workload: str, backends: list[str], *, model: str | None = None, steps: int = 10, warmup: int = 2,
          batch_size: int | None = None, seq_len: int | None = None, overrides: list[str] = (),
          out: Path | None = None, threads: int | None = None, pad_multiple: int | None = None, plot: bool = True,
          echo=print) -> dict:
    """Run the workload on each backend; returns the report (also bench.json)."""
    from mlxft.blas import describe

    threads = threads or os.cpu_count() or 1
    out = Path(out) if out else default_out(workload)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"bench folder {out} is not empty; choose another --out")
    config = workloads.resolve_config(workload, model, list(overrides), batch_size, seq_len)
    work = workloads.build(workload, config, steps=steps, warmup=warmup, pad_multiple=pad_multiple)
    spec_path = workloads.save(work, out / "workload")
    counts = flops.parameter_counts(work.model_config, work.spec)
    tc = config.train
    echo(f"bench {workload}: model {work.model_dir}; LoRA r={work.spec.r} alpha={work.spec.alpha:g} on "
         f"{', '.join(work.spec.target_modules)}; batch {tc.batch_size} x {tc.grad_accumulation}; "
         f"{warmup} warm-up + {steps} timed steps; {threads} threads per backend; "
         f"batches padded {padding_policy(backends, pad_multiple)}"
         + (f"; {shared_prompts_policy(backends, pad_multiple)}" if workload == "dpo" and config.dpo.share_prompt else ""))
    echo(f"MLX BLAS: {describe()}")

    results = {}
    for backend in backends:
        echo(f"running {backend} ...")
        results[backend] = run_child(spec_path, backend, threads, out)
    peak = max((rate for r in results.values() for rate in r.get("gemm_gflops", {}).values()), default=None)
    rows = [summarize(results[b], counts, peak, workload) for b in backends]
    report = {
        "workload": workload,
        "model": str(work.model_dir),
        "adapter": {"r": work.spec.r, "alpha": work.spec.alpha, "target_modules": work.spec.target_modules,
                    "layers": work.spec.layers, "dropout": work.spec.dropout},
        "batch_size": tc.batch_size,
        "grad_accumulation": tc.grad_accumulation,
        "learning_rate": tc.learning_rate,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "threads": threads,
        "pad_multiple": {b: pad_multiple or workloads.backend_pad_multiple(b) for b in backends},
        "host": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "mlx_blas": describe(),
        "peak_gemm_gflops": peak,
        "parameters": counts,
        "flops_counting": "6 x (block + LoRA weights) per processed token + 6 x head per head position "
                          "(+2x each for DPO's reference forward); see mlxft/bench/flops.py",
        "rows": rows,
        "loss_agreement": loss_agreement(results),
        "results": results,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    echo(format_table(report))
    if plot:
        from mlxft.bench.report import plot_bench

        try:
            report["plot"] = str(plot_bench(report, out / "bench.png"))
        except UserError as e:  # no matplotlib: the numbers are already out, say what the PNG needs
            echo(f"no bench.png: {e}")
    echo(f"bench folder: {out}")
    return report


def padding_policy(backends: list[str], pad_multiple: int | None) -> str:
    """'to a multiple of 8' for --pad-multiple 8, else 'as each trainer pads them, to a multiple of 16 (mlx), 1 (torch)'."""
    if pad_multiple:
        return f"to a multiple of {pad_multiple}"
    return "as each trainer pads them, to a multiple of " + ", ".join(
        f"{workloads.backend_pad_multiple(b)} ({b})" for b in backends)


def shared_prompts_policy(backends: list[str], pad_multiple: int | None) -> str:
    """How DPO lays its pairs out when each prompt runs once (mlxft.data.shared_prompt)."""
    from mlxft.bench.workload import backend_shared_prompt_padding

    if pad_multiple:
        return f"each prompt run once, prompt and answer widths to a multiple of {pad_multiple}"
    return "each prompt run once, prompt and answer widths to a multiple of " + ", ".join(
        f"{backend_shared_prompt_padding(b)[0]} ({b})" for b in backends)


def run_child(spec_path: Path, backend: str, threads: int, out: Path, measure_gemm: bool = True) -> dict:
    """One backend in its own process; its output goes to OUT/<backend>.log. Without
    `measure_gemm` it skips the host's GEMM rate (memory is all `mlxft plan` wants)."""
    if backend == "torch":
        from mlxft.backends import TORCH_HINT, torch_available

        if not torch_available():
            return {"backend": backend, "available": False, "reason": TORCH_HINT}
    result_path = out / f"{backend}.result.json"
    log_path = out / f"{backend}.log"
    from mlxft.bench.gemm import THREAD_VARIABLES

    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    # The package's own folder first: the child must import this very mlxft, wherever it runs.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, "-m", "mlxft.bench.child", str(spec_path), backend, str(threads),
                               str(result_path), *([] if measure_gemm else ["--no-gemm"])],
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not result_path.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] if log_path.exists() else []
        return {"backend": backend, "available": False,
                "reason": f"failed (exit {code}): {tail[0] if tail else 'no output'}; see {log_path}"}
    return json.loads(result_path.read_text())


def summarize(result: dict, counts: dict, peak_gflops: float | None, workload: str) -> dict:
    """The table row of one backend, from its per-step records (timed steps only)."""
    if not result.get("available"):
        return {"backend": result["backend"], "available": False, "reason": result.get("reason", "")}
    timed = [s for s in result["steps"] if s["timed"]]
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    supervised = sum(s["supervised_tokens"] for s in timed)
    padded = sum(s["padded_tokens"] for s in timed)
    # What the model ran: fewer than `tokens` when DPO runs each prompt once (step_record).
    computed = sum(s.get("computed_tokens", s["tokens"]) for s in timed)
    # The LM head runs on the scored positions when the backend splits it off, else everywhere.
    model_flops = sum(flops.step_flops(counts, s.get("computed_tokens", s["tokens"]),
                                       s["supervised_tokens"] if result["split_head"] else s["tokens"],
                                       reference_forward=workload == "dpo") for s in timed)
    flops_per_second = model_flops / seconds
    return {
        "backend": result["backend"],
        "available": True,
        "device": result["device"],
        "threads": result.get("threads"),
        "tokens_per_second": tokens / seconds,
        "supervised_tokens_per_second": supervised / seconds,
        # Per second of the process's CPU time (all threads): what a host shared with other work
        # disturbs least, with one thread per side; with more, spin-waiting threads count too.
        "tokens_per_cpu_second": tokens / sum(s["cpu_seconds"] for s in timed),
        "median_step_seconds": statistics.median(s["seconds"] for s in timed),
        "peak_memory_gb": result["peak_memory_gb"],
        "peak_memory_kind": result["peak_memory_kind"],
        "peak_rss_gb": result["peak_rss_gb"],
        "last_loss": result["steps"][-1]["loss"],
        "padding_fraction": 1 - computed / padded,
        "computed_tokens_per_second": computed / seconds,
        "shared_prompts": result.get("shared_prompts", False),
        "model_tflops_per_second": flops_per_second / 1e12,
        "peak_share": flops_per_second / (peak_gflops * 1e9) if peak_gflops else None,
        "timed_steps": len(timed),
        "warmup_steps": len(result["steps"]) - len(timed),
        "timed_seconds": seconds,
        "timed_tokens": tokens,
        "timed_supervised_tokens": supervised,
        "gemm_gflops": result.get("gemm_gflops", {}),
    }


def loss_agreement(results: dict) -> dict | None:
    """Largest difference of per-step losses between the backends that ran (same weights, same batches)."""
    ran = [r for r in results.values() if r.get("available")]
    if len(ran) < 2:
        return None
    per_step = [[s["loss"] for s in r["steps"]] for r in ran]
    differences = [max(values) - min(values) for values in zip(*per_step)]
    return {"backends": [r["backend"] for r in ran], "max_abs_difference": max(differences),
            "last_step_difference": differences[-1]}


COLUMNS = (("backend", "backend"), ("device", "device"), ("threads", "threads"), ("tok/s", "tokens_per_second"),
           ("sup tok/s", "supervised_tokens_per_second"), ("median step s", "median_step_seconds"),
           ("peak mem GB", "peak_memory_gb"), ("peak RSS GB", "peak_rss_gb"), ("last loss", "last_loss"),
           ("padding", "padding_fraction"), ("% of peak", "peak_share"))


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("padding_fraction", "peak_share"):
        return f"{100 * value:.1f}%"
    if key == "last_loss":
        return f"{value:.5f}"
    if key in ("tokens_per_second", "supervised_tokens_per_second"):
        return f"{value:,.1f}"
    if key in ("median_step_seconds",):
        return f"{value:.3f}"
    if key in ("peak_memory_gb", "peak_rss_gb"):
        return f"{value:.2f}"
    return str(value)


def format_table(report: dict) -> str:
    header = [title for title, _ in COLUMNS]
    lines = []
    for row in report["rows"]:
        if row["available"]:
            lines.append([_cell(key, row.get(key)) for _, key in COLUMNS])
        else:
            lines.append([row["backend"], f"not available: {row['reason']}"])
    widths = [max([len(header[i])] + [len(line[i]) for line in lines if len(line) == len(header)]) for i in range(len(header))]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for line in lines:
        text.append("  ".join(c.ljust(w) for c, w in zip(line, widths)) if len(line) == len(header) else "  ".join(line))
    notes = []
    if report["peak_gemm_gflops"]:
        rates = {f"{row['backend']}:{name}": rate for row in report["rows"] if row["available"]
                 for name, rate in row["gemm_gflops"].items()}
        notes.append(f"peak GEMM (1024^3 fp32, best measured): {report['peak_gemm_gflops']:.1f} GFLOP/s ("
                     + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + ")")
    agreement = report["loss_agreement"]
    if agreement:
        notes.append(f"losses of {' and '.join(agreement['backends'])}: largest per-step difference "
                     f"{agreement['max_abs_difference']:.2e} (last step {agreement['last_step_difference']:.2e})")
    ran = [row for row in report["rows"] if row["available"]]
    if ran:
        notes.append("peak mem: " + "; ".join(f"{row['backend']} = {row['peak_memory_kind']}" for row in ran))
    return "\n".join(text + notes)
