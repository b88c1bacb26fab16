"""`mlxft recipes`, `mlxft doctor`, `mlxft bench` and `mlxft plan`."""

from __future__ import annotations

from pathlib import Path

import click

from mlxft.cli.common import Group, cli


@cli.group(cls=Group, invoke_without_command=True)
@click.pass_context
def recipes(ctx):
    """List the bundled recipes; `mlxft recipes show NAME` prints one."""
    if ctx.invoked_subcommand is None:
        from mlxft.config import list_recipes

        for name, description in list_recipes():
            click.echo(f"{name:14s} {description}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe with its comments."""
    from mlxft.config import recipe_path

    click.echo(recipe_path(name).read_text(), nl=False)


@cli.command("doctor")
def doctor_command():
    """What this host gives mlxft: versions, MLX's device and BLAS, the measured 1024³ GEMM rate of
    MLX, numpy and torch, and the device --backend torch would use."""
    from mlxft.bench.doctor import format_report, report

    click.echo(format_report(report()))


@cli.command("bench")
@click.option("--workload", type=click.Choice(["lora", "dpo"]), default="lora", show_default=True,
              help="lora: TALLRec rows (tallrec recipe); dpo: preference pairs (dpo recipe).")
@click.option("--backends", default="mlx,torch", show_default=True, help="Comma-separated: mlx, torch.")
@click.option("--model", default=None, help="'builtin' (default), a local Hugging Face folder or a hub id.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Timed optimizer steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed steps first (compilation, first allocations).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Rows (dpo: pairs) per micro-batch; default: the recipe's.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Longest example in tokens (data.cutoff; dpo.max_length for dpo).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for every backend (default: all cores).")
@click.option("--pad-multiple", type=click.IntRange(min=1), default=None,
              help="Pad every backend's batch widths to a multiple of this (default: as each trainer pads: MLX 16, PyTorch 1).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting, e.g. --set lora.r=16 (repeatable).")
@click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path),
              help="Folder for bench.json, bench.png and logs. Default: runs/bench-<workload>-<time>.")
def bench_command(workload, backends, model, steps, warmup, batch_size, seq_len, threads, pad_multiple, overrides, out_dir):
    """The same workload (data, model, starting adapter, hyperparameters) on each backend, timed
    after warm-up: processed and supervised tokens/s, median step time, peak memory, the loss at
    the last step (equal on every backend: proof of equal work), padding, and the share of the
    host's measured peak GEMM rate. Prints a table; writes bench.json and bench.png."""
    from mlxft.bench.harness import bench, parse_backends

    bench(workload, parse_backends(backends), model=model, steps=steps, warmup=warmup, batch_size=batch_size,
          seq_len=seq_len, overrides=list(overrides), out=out_dir, threads=threads, pad_multiple=pad_multiple,
          echo=click.echo)


@cli.command("plan")
@click.option("--recipe", required=True, help="The recipe the run will use (see `mlxft recipes`).")
@click.option("--model", default=None, help="'builtin' (default), a local Hugging Face folder, a GGUF file or a hub id.")
@click.option("--for", "method", type=click.Choice(["lora", "dpo", "reward", "rl"]), default="lora", show_default=True,
              help="The command the run will use: lora (SFT), dpo, reward or rl.")
@click.option("--backend", type=click.Choice(["auto", "mlx", "torch"]), default="auto", show_default=True)
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize on load (QLoRA), as the run will.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for the measured steps (default: all cores).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting, as the run will (repeatable).")
@click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path),
              help="Keep the measured steps' workloads and logs here (default: a temporary folder, removed).")
def plan_command(recipe, model, method, backend, quantize, threads, overrides, out_dir):
    """The memory a run needs, and the largest train.batch_size and data.cutoff that fit this
    machine: the recipe's training step is run at full length on 1 and 2 rows (and 1 of half the
    length), and the peaks are fitted (see mlxft.train.plan)."""
    from mlxft.backends import resolve_backend
    from mlxft.cli.common import resolve_config
    from mlxft.train.plan import plan

    config = resolve_config(recipe, model, None, None, list(overrides), int(quantize) if quantize else None, False)
    plan(config, resolve_backend(backend, quantized=bool(config.model.quantize)), method=method, threads=threads,
         out=out_dir, echo=click.echo)
