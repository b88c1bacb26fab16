"""What every `mlxft` command shares: the click group whose errors are one line, the options
declared once (run, generation, sampling, backend), and small helpers the commands call."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from mlxft import __version__
from mlxft.errors import UserError

# transformers announces at import that PyTorch is missing; on the MLX side that is expected.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class Group(click.Group):
    """Prints a user mistake as one line and exits 2, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            # One line, whatever the message quotes of the user's input (a value may hold a newline).
            click.echo(f"error: {' '.join(str(e).splitlines())}", err=True)
            sys.exit(2)
        except (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
            # A path the user named that cannot be written or read as asked (--out naming a file, a
            # folder without write permission): their mistake, said in one line.
            click.echo(f"error: {e.filename}: {e.strerror.lower() if e.strerror else e}", err=True)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxft")
def cli():
    """Fine-tune language models on this machine: MLX first, PyTorch too."""


def run_options(function):
    """Options shared by the commands that train: recipe, model, data, run folder, overrides."""
    options = [
        click.option("--recipe", default=None, help="A bundled recipe name (see `mlxft recipes`) or a .yaml path."),
        click.option("--model", default=None, help="'builtin' (default), a local Hugging Face folder or a hub id; quantized MLX models train as QLoRA."),
        click.option("--data", "data_source", default=None,
                     help="A MIND folder, a .json/.jsonl/.csv file, a folder of train/valid/test.jsonl, or a Hugging Face data set "
                          "hf:NAME[:CONFIG][@SPLIT]. Default: the recipe's bundled sample."),
        click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path), help="Run folder. Default: runs/<recipe>-<time>."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting, e.g. --set train.steps=100 (repeatable)."),
        click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the model on load (QLoRA)."),
        click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]),
                     help="auto: MLX on Apple Silicon; elsewhere PyTorch when installed (measured faster on CPU too), else MLX."),
        click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default)."),
        REPORT_TO_OPTION,
    ]
    for option in reversed(options):
        function = option(function)
    return function


# train.report_to from the command line: TRL's --report_to, as a comma list.
REPORT_TO_OPTION = click.option(
    "--report-to", "report_to", default=None, metavar="NAMES",
    help="Send every report also to tensorboard (RUN/tensorboard/), wandb (RUN/wandb/; WANDB_MODE, WANDB_PROJECT apply), "
         "both (tensorboard,wandb), or none (default: the recipe's train.report_to, none).")


def resolve_config(recipe, model, data_source, out_dir, overrides, quantize, trust_remote_code, report_to=None):
    from mlxft.config import load_config
    from mlxft.train.report_to import parse_names

    settings = list(overrides)
    if model:
        settings.append(f"model.name={model}")
    if data_source:
        settings.append(f"data.source={data_source}")
    if quantize:
        settings.append(f"model.quantize={quantize}")
    if trust_remote_code:
        settings.append("model.trust_remote_code=true")
    if report_to is not None:
        settings.append(f"train.report_to=[{', '.join(parse_names(report_to))}]")
    config = load_config(recipe, settings)
    if out_dir:
        config.out = str(out_dir)
    return config


def int_list(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{what} takes comma-separated whole numbers, like 16,64,256; got {text!r}") from None


def model_backend(backend: str, what: str) -> str:
    """'mlx' or 'torch' for fuse, generate, chat and serve. auto stays MLX for them on every host:
    mlx-lm runs them on any Linux or macOS machine, the server batches requests and mixes adapters
    on MLX only, and the PyTorch side gives the same greedy answers (tests/test_chat.py), so
    nothing is gained by switching a user's default."""
    from mlxft.backends import TORCH_HINT, torch_available

    if backend == "torch" and not torch_available():
        raise UserError(f"{what} --backend torch: {TORCH_HINT}")
    return "torch" if backend == "torch" else "mlx"


BACKEND_OPTION = click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]),
                               help="Which backend runs the model: mlx (mlx-lm) or torch (transformers + PEFT; CUDA, MPS or CPU); auto means MLX here.")


def generation_options(function, adapter_option=None):
    """Options shared by generate, chat and serve: model, adapter, template and sampling (serve
    brings its own --adapter, which it takes many times)."""
    options = [
        click.option("--model", default=None,
                     help="'builtin', a local Hugging Face folder (fused or not) or a hub id; default: the adapter's base model, else builtin."),
        adapter_option or click.option("--adapter", default=None, type=click.Path(path_type=Path),
                                       help="Apply an adapter (or a run folder's best/) without fusing."),
        click.option("--template", default="auto", show_default=True, type=click.Choice(["auto", "chat", "alpaca", "plain"]),
                     help="auto: the tokenizer's chat template if it has one, else alpaca (single-turn, instruction + optional input)."),
        BACKEND_OPTION,
        click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def sampling_options(function):
    options = [
        click.option("--system", default=None, help="System prompt."),
        click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Nucleus sampling; 1 is off."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Sample among the k likeliest tokens; 0 is off."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Longest answer in tokens."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
        click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
                     help="Above 1 discourages repeating recent tokens."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def sampling_from(temperature, top_p, top_k, max_tokens, seed, repetition_penalty):
    from mlxft.generation import Sampling

    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                    repetition_penalty=repetition_penalty)


def load_generator(model, adapter, backend, trust_remote_code, what):
    """The model (+ adapter) that generate, chat, serve and eval generate stream answers from."""
    from mlxft.backends import engine_for

    return engine_for(model_backend(backend, what)).load_generator(model, adapter, trust_remote_code=trust_remote_code)


def load_any(source: str | Path, columns: dict[str, str] | None = None, max_rows: int | None = None):
    """Rows from a file, TALLRec rows from a MIND folder, or every row of a Hugging Face data set
    (hf:NAME[:CONFIG][@SPLIT]); the first `max_rows` (of each split), columns renamed by `columns`."""
    from mlxft.data.records import load_records, rename_columns
    from mlxft.data.sources.hub import is_hub, read_hub

    if is_hub(str(source)):
        rows = read_hub(str(source), columns=columns, max_rows=max_rows)
        return rows if isinstance(rows, list) else [record for part in rows for record in part]
    path = Path(source)
    if path.is_dir() and (path / "behaviors.tsv").exists():
        from mlxft.data.dataset import mind_records

        return rename_columns(mind_records(path)[:max_rows], columns)
    return rename_columns(load_records(path)[:max_rows], columns)
