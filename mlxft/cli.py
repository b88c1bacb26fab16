"""The `mlxft` command. Each sub-command is a thin shell over library calls."""

from __future__ import annotations

import json
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


@cli.group(cls=Group)
def data():
    """Convert, split and inspect data sets."""


@data.group(cls=Group)
def convert():
    """Convert public data sets into training rows."""


@convert.command("mind")
@click.argument("mind_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for train.jsonl, valid.jsonl and test.jsonl.")
@click.option("--max-history", type=click.IntRange(min=1), default=None,
              help="Show at most this many liked + disliked titles (the most recent). Default: all.")
@click.option("--use-history/--no-use-history", default=False, show_default=True,
              help="Add the titles of the History column as extra liked titles.")
@click.option("--min-impressions", type=click.IntRange(min=2), default=5, show_default=True,
              help="Skip behaviors rows with fewer impressions (the last one is the target).")
@click.option("--split", "fractions", default="0.85,0.10,0.05", show_default=True,
              help="Train, validation and test fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
def convert_mind_command(mind_dir, out_dir, max_history, use_history, min_impressions, fractions, seed):
    """MIND folder (behaviors.tsv + news.tsv) -> TALLRec Yes/No rows.

    Per behaviors row with enough impressions, every impression but the last becomes a liked or
    disliked title and the last is the target, answered "Yes." or "No.". The files are streamed,
    so MIND-large works in little memory.
    """
    from mlxft.data.sources.mind import convert_mind
    from mlxft.data.splits import parse_fractions

    stats = convert_mind(mind_dir, out_dir, fractions=parse_fractions(fractions), seed=seed,
                         max_history=max_history, use_history=use_history, min_impressions=min_impressions)
    click.echo(stats.summary())
    click.echo(f"wrote {out_dir}/train.jsonl, valid.jsonl, test.jsonl")


@convert.command("pairs")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path), help="Output JSONL of prompt/chosen/rejected rows.")
@click.option("--support-ratio", type=click.FloatRange(0, 1), required=True,
              help="The first ratio x N rows prefer the supporting answer, the rest the opposing one.")
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Use only the first N rows.")
@click.option("--prompt-field", default="prompt", show_default=True, help="Column holding the prompt.")
@click.option("--support-field", default="support", show_default=True, help="Column holding the supporting answer.")
@click.option("--oppose-field", default="oppose", show_default=True, help="Column holding the opposing answer.")
def convert_pairs_command(file, out_file, support_ratio, max_rows, prompt_field, support_field, oppose_field):
    """Rows with two opposing answers -> DPO preference pairs (prompt, chosen, rejected)."""
    from mlxft.data.records import load_records, write_jsonl
    from mlxft.data.sources.pairs import opposing_to_preference

    rows = opposing_to_preference(load_records(file), support_ratio, max_rows, prompt_field=prompt_field,
                                  support_field=support_field, oppose_field=oppose_field)
    write_jsonl(rows, out_file)
    click.echo(f"wrote {len(rows)} pairs to {out_file}")


@data.command("split")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for train/valid/test.jsonl.")
@click.option("--split", "fractions", default="0.85,0.10,0.05", show_default=True, help="Train, validation and test fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and of the K-shot draw.")
@click.option("--k-shot", type=click.IntRange(min=1), default=None, help="Keep only K training rows, sampled with the seed.")
def split_command(file, out_dir, fractions, seed, k_shot):
    """Split a JSON/JSONL/CSV file into seeded train / validation / test JSONL files."""
    from mlxft.data.records import load_records, write_jsonl
    from mlxft.data.splits import parse_fractions, sample_k_shot, split_items

    rows = [r.fields for r in load_records(file)]
    train, valid, test = split_items(rows, parse_fractions(fractions), seed)
    if k_shot:
        train = sample_k_shot(train, k_shot, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("valid", valid), ("test", test)):
        write_jsonl(part, out_dir / f"{name}.jsonl")
    click.echo(f"wrote {len(train)} train, {len(valid)} valid, {len(test)} test rows to {out_dir}")


@data.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer_name", default="builtin", show_default=True,
              help="Model whose tokenizer counts tokens: 'builtin', a local folder or a hub id.")
@click.option("--template", default="auto", show_default=True,
              help="auto, alpaca, phi3, chat, plain, or a format string with {column} placeholders.")
@click.option("--completion-field", default=None, help="Column holding the answer, with a format string.")
@click.option("--cutoff", type=click.IntRange(min=1), default=512, show_default=True, help="Cutoff length in tokens.")
@click.option("--train-on-inputs", is_flag=True, help="Score the prompt tokens too.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub tokenizer to run its own code.")
def inspect_command(file, tokenizer_name, template, completion_field, cutoff, train_on_inputs, as_json, trust_remote_code):
    """Schema, row count, token lengths, label balance and one example with its loss mask.

    FILE is a .json/.jsonl/.csv file, or a MIND folder (converted on the fly).
    """
    from mlxft.data.inspect import format_inspection, inspect_records
    from mlxft.data.templates import schema_and_template
    from mlxft.model_files import load_tokenizer

    records = _load_any(file)
    schema, template = schema_and_template(records, template, completion_field)  # fail before loading
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code)
    info = inspect_records(records, tokenizer, source=str(file), schema=schema, template=template,
                           completion_field=completion_field, cutoff=cutoff, train_on_inputs=train_on_inputs)
    click.echo(json.dumps(info.to_dict(), indent=2) if as_json else format_inspection(info))


def _run_options(function):
    """Options shared by the commands that train: recipe, model, data, run folder, overrides."""
    options = [
        click.option("--recipe", default=None, help="A bundled recipe name (see `mlxft recipes`) or a .yaml path."),
        click.option("--model", default=None, help="'builtin' (default), a local Hugging Face folder or a hub id; quantized MLX models train as QLoRA."),
        click.option("--data", "data_source", default=None,
                     help="A MIND folder, a .json/.jsonl/.csv file, or a folder of train/valid/test.jsonl. Default: the recipe's bundled sample."),
        click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path), help="Run folder. Default: runs/<recipe>-<time>."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting, e.g. --set train.steps=100 (repeatable)."),
        click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the model on load (QLoRA)."),
        click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]),
                     help="auto: MLX on Apple Silicon; elsewhere PyTorch when installed (measured faster on CPU too), else MLX."),
        click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _resolve_config(recipe, model, data_source, out_dir, overrides, quantize, trust_remote_code):
    from mlxft.config import load_config

    settings = list(overrides)
    if model:
        settings.append(f"model.name={model}")
    if data_source:
        settings.append(f"data.source={data_source}")
    if quantize:
        settings.append(f"model.quantize={quantize}")
    if trust_remote_code:
        settings.append("model.trust_remote_code=true")
    config = load_config(recipe, settings)
    if out_dir:
        config.out = str(out_dir)
    return config


@cli.command("lora")
@_run_options
@click.option("--resume", "resume_dir", default=None, type=click.Path(path_type=Path), help="Continue a stopped run from its last checkpoint.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="Start from an existing adapter (PEFT layout) instead of a new one.")
def lora_command(recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code, resume_dir, adapter):
    """Fine-tune with LoRA (or full fine-tuning: --set lora.full_finetune=true).

    Prints validation loss (and AUC for Yes/No data) before and after, and writes the run folder:
    config.yaml, metrics.jsonl, summary.json, best/ and last/ adapters, checkpoint/.
    """
    summary = _train("sft", recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code,
                     resume_dir, adapter)
    _print_outcome(summary)


def _train(method, recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code, resume_dir, adapter):
    """Check everything a user gave, then create (or resume) the run folder, hold it, and train.
    A mistake found before the first report leaves no run folder behind (see runs.start)."""
    from mlxft import backends, runs
    from mlxft.backends import is_mlx_quantized, resolve_backend

    if resume_dir:
        if recipe or model or data_source or out_dir or overrides or quantize or adapter:
            raise UserError("--resume continues a run with its own config.yaml; give no other settings")
        config = None
    else:
        if recipe is None:
            raise UserError(f"name a recipe: --recipe {'tallrec' if method == 'sft' else 'dpo'} (see `mlxft recipes`)")
        config = _resolve_config(recipe, model, data_source, out_dir, overrides, quantize, trust_remote_code)
        if adapter:
            _check_start_adapter(adapter, config)
        backend = resolve_backend(backend, quantized=bool(config.model.quantize) or is_mlx_quantized(config.model.name))
    with runs.start(config, resume_dir) as (config, run):
        if resume_dir:
            # A checkpoint holds one backend's optimizer state.
            written_by = run.checkpoint_state()["backend"]
            if backend not in ("auto", written_by):
                raise UserError(f"--resume {resume_dir}: its checkpoint was written by the {written_by} backend; "
                                f"resume it with --backend {written_by}")
            backend = resolve_backend(written_by)
        trainer = getattr(backends.get(backend), method)
        return trainer.train(config, run, resume=run.resumed, adapter=str(adapter) if adapter else None, echo=click.echo)


def _check_start_adapter(adapter: Path, config) -> None:
    """--adapter continues a LoRA adapter: refuse what would silently ignore it."""
    from mlxft.adapters import adapter_folder

    if config.lora.full_finetune:
        why = " (the recipe's builtin_model section turns it on for the built-in model)" if config.builtin_model.get("lora.full_finetune") else ""
        raise UserError(f"--adapter continues a LoRA adapter, but this run is full fine-tuning (lora.full_finetune=true{why}); "
                        "add --set lora.full_finetune=false to train the adapter")
    adapter_folder(adapter)  # missing, a file, empty: said now, before a run folder exists


def _print_outcome(summary: dict) -> None:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    for key in ("eval_auc", "eval_loss"):
        if key in before and key in after:
            click.echo(f"validation {key[5:]}: {before[key]:.4f} -> {after[key]:.4f}")
    if summary.get("generations"):
        for item in summary["generations"]:
            click.echo(f"--- {item['origin']}\nprompt: {item['prompt']!r}\nanswer: {item['answer']!r}\nexpected: {item['expected']!r}")
    click.echo(f"adapter: {summary['adapter']}")


@cli.command("dpo")
@_run_options
@click.option("--resume", "resume_dir", default=None, type=click.Path(path_type=Path), help="Continue a stopped run from its last checkpoint.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path),
              help="Continue an existing adapter (PEFT layout, e.g. an SFT run's best/); it is also the reference.")
def dpo_command(recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code, resume_dir, adapter):
    """Direct preference optimisation on {prompt, chosen, rejected} pairs (or support/oppose rows
    with --set dpo.support_ratio=R).

    The reference is the base model with the adapter switched off (no second copy of the
    weights), or the adapter it continues. Prints validation loss and reward accuracy before and
    after, and writes the run folder: config.yaml, metrics.jsonl (TRL's metric names),
    summary.json, best/ and last/ adapters, checkpoint/, and comparison.md / comparison.json
    with held-out answers before and after.
    """
    summary = _train("dpo", recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code,
                     resume_dir, adapter)
    before, after = summary.get("before") or {}, summary.get("after") or {}
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if key in before and key in after:
            click.echo(f"validation {key[5:]}: {before[key]:.4f} -> {after[key]:.4f}")
    if summary.get("comparison"):
        comparison = summary["comparison"]
        click.echo(f"answers before and after: {comparison['markdown']}")
        empty = comparison.get("empty_answers") or {}
        if any(empty.values()):
            click.echo(f"warning: empty answers, {empty['before']} of {comparison['prompts']} before and {empty['after']} "
                       "after: is the template right for this model (data.template)?", err=True)
    click.echo(f"adapter: {summary['adapter']}")


@cli.group("eval", cls=Group)
def eval_group():
    """Evaluate a model or adapter."""


@eval_group.command("auc")
@click.option("--model", default="builtin", show_default=True, help="'builtin', a local Hugging Face folder or a hub id.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="An adapter folder (PEFT layout) or a run folder.")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="Yes/No rows (.jsonl/.json) or a MIND folder.")
@click.option("--template", default="alpaca", show_default=True, help="The template the model was trained with.")
@click.option("--answers", default="Yes.,No.", show_default=True, help="Positive and negative answer, comma-separated.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Rows per forward pass.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]), help="Which backend runs the model.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default).")
def eval_auc(model, adapter, data_path, template, answers, batch_size, backend, as_json, trust_remote_code):
    """AUC from the Yes/No probabilities at the first answer position, as TALLRec scores it.

    The two answer tokens come from the tokenizer and template (never hard-coded ids); also
    prints label balance and accuracy at 0.5.
    """
    from mlxft import backends
    from mlxft.backends import is_mlx_quantized, resolve_backend

    score_yes_no = backends.get(resolve_backend(backend, quantized=is_mlx_quantized(model))).evaluate.score_yes_no
    positive, _, negative = answers.partition(",")
    if not negative:
        raise UserError("--answers takes two answers, like Yes.,No.")
    records = _load_any(data_path)
    report = score_yes_no(model, str(adapter) if adapter else None, records, template=template,
                          answers=[positive, negative], batch_size=batch_size, trust_remote_code=trust_remote_code)
    report.pop("probabilities")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"rows {report['rows']}, positive rate {report['positive_rate']:.3f} "
                   f"({positive!r} {round(report['positive_rate'] * report['rows'])} / {negative!r} "
                   f"{report['rows'] - round(report['positive_rate'] * report['rows'])})")
        click.echo(f"AUC {report['auc']:.4f}, accuracy at 0.5 {report['accuracy']:.4f}, answer loss {report['loss']:.4f}")


@eval_group.command("rank")
@click.option("--model", default="builtin", show_default=True, help="'builtin', a local Hugging Face folder or a hub id.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="An adapter folder (PEFT layout) or a run folder.")
@click.option("--data", "mind_dir", required=True, type=click.Path(path_type=Path), help="A MIND folder (behaviors.tsv + news.tsv).")
@click.option("--max-history", type=click.IntRange(min=0), default=10, show_default=True, help="Most recent History clicks shown as the user's preference.")
@click.option("--max-impressions", type=click.IntRange(min=1), default=None, help="Score only the first N impressions.")
@click.option("--template", default="alpaca", show_default=True, help="The template the model was trained with.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Rows per forward pass.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]), help="Which backend runs the model.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default).")
def eval_rank(model, adapter, mind_dir, max_history, max_impressions, template, batch_size, backend, as_json, trust_remote_code):
    """MIND ranking: every candidate of each impression scored by P(Yes); AUC, MRR, nDCG@5 and
    nDCG@10 per impression, averaged over impressions, as MIND's official evaluation does.

    The prompt shows the user's History clicks (never another candidate's label) and asks about
    each candidate in turn.
    """
    import itertools

    from mlxft import backends
    from mlxft.backends import is_mlx_quantized, resolve_backend
    from mlxft.data.records import Record
    from mlxft.data.sources.mind import iter_impressions
    from mlxft.eval.ranking import ranking_report

    score_yes_no = backends.get(resolve_backend(backend, quantized=is_mlx_quantized(model))).evaluate.score_yes_no
    impressions = list(itertools.islice(iter_impressions(mind_dir, max_history=max_history), max_impressions))
    records = [Record(row, f"{mind_dir}/behaviors.tsv impression {impression}")
               for impression, rows in impressions for row in rows]
    if not records:
        raise UserError(f"{mind_dir}: no impressions to rank")
    scored = score_yes_no(model, str(adapter) if adapter else None, records, template=template,
                          answers=["Yes.", "No."], batch_size=batch_size, trust_remote_code=trust_remote_code)
    probabilities, start, groups = scored["probabilities"], 0, []
    for _, rows in impressions:
        groups.append((probabilities[start:start + len(rows)], [row["output"] == "Yes." for row in rows]))
        start += len(rows)
    report = ranking_report(groups)
    report["candidates"] = len(records)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{report['impressions']} impressions ({report['candidates']} candidates; "
                   f"{report['skipped_one_class']} left out: all clicked or none)")
        click.echo("  ".join(f"{name} {report[name]:.4f}" for name in ("auc", "mrr", "ndcg@5", "ndcg@10")))


@eval_group.command("generate")
@click.option("--model", default=None, help="'builtin', a local Hugging Face folder or a hub id (default: the adapter's base).")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="An adapter folder (PEFT layout) or a run folder.")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="Rows to answer (.jsonl/.json/.csv).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="JSON file: each row with a model_response field added.")
@click.option("--template", default="auto", show_default=True, help="The template the model was trained with (alpaca, phi3, chat, plain, or a format string).")
@click.option("--completion-field", default=None, help="The answer's column, with a format-string template.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Longest answer, in tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0: greedy, the same answers every time.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed, when --temperature > 0.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]), help="Which backend runs the model.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default).")
def eval_generate(model, adapter, data_path, out, template, completion_field, max_tokens, temperature, seed, backend, trust_remote_code):
    """Answer every row with the template the model was trained with, and write the rows back
    with a `model_response` field (for reading, or for `mlxft eval judge`)."""
    from dataclasses import replace

    from mlxft.chat import stream_answer
    from mlxft.data.records import load_records
    from mlxft.data.templates import render, schema_and_template
    from mlxft.files import write_atomic
    from mlxft.generation import Sampling
    from mlxft.progress import Progress

    records = load_records(data_path)
    generator = _load_generator(model, str(adapter) if adapter else None, backend, trust_remote_code, "eval generate")
    schema, template = schema_and_template(records, template, completion_field)
    sampling = Sampling(temperature=temperature, max_tokens=max_tokens)
    progress = Progress(len(records), unit="row")
    answered = []
    for i, record in enumerate(records):
        prompted = render(record, schema, template, generator.tokenizer, completion_field=completion_field)
        # One seed per row: a row's answer does not depend on which rows came before it.
        response = stream_answer(generator, prompted.prompt, replace(sampling, seed=seed + i), lambda text: None)
        answered.append({**record.fields, "model_response": response})
        progress.update()
    progress.close()
    write_atomic(out, json.dumps(answered, indent=2, ensure_ascii=False))
    click.echo(f"{len(answered)} rows answered ({template} template) -> {out}")
    empty = sum(not row["model_response"].strip() for row in answered)
    if empty:
        click.echo(f"warning: {empty} of {len(answered)} answers are empty: is --template right for this model "
                   "(an instruct model needs its chat template)?", err=True)


@eval_group.command("judge")
@click.option("--responses", "responses_path", required=True, type=click.Path(path_type=Path), help="Rows with model_response (from `mlxft eval generate`).")
@click.option("--judge-url", required=True, help="The judge's server, e.g. http://127.0.0.1:11434 (Ollama) or http://127.0.0.1:8080 (OpenAI-compatible).")
@click.option("--judge-model", required=True, help="The judge model's name on that server.")
@click.option("--api", type=click.Choice(["ollama", "openai"]), default="ollama", show_default=True, help="The server's API.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sent with every request (temperature is always 0).")
@click.option("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Judged rows (default RESPONSES with .judged.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_judge(responses_path, judge_url, judge_model, api, seed, api_key, out, as_json):
    """Score each response 0-100 against its reference answer with an LLM judge (fixed prompt,
    temperature 0, a seed). <think> blocks are skipped; replies without a score are counted and
    listed, not dropped."""
    from mlxft.data.records import load_records
    from mlxft.eval.judge import judge
    from mlxft.files import write_atomic
    from mlxft.progress import Progress

    rows = [record.fields for record in load_records(responses_path)]
    progress = Progress(len(rows), unit="row")
    judged, report = judge(rows, judge_url, judge_model, api=api, seed=seed, api_key=api_key,
                           progress=lambda: progress.update())
    progress.close()
    out = out or responses_path.with_suffix(".judged.json")
    write_atomic(out, json.dumps(judged, indent=2, ensure_ascii=False))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"mean score {report['mean']:.1f} over {report['count']} of {report['rows']} rows; "
               f"{report['unparseable']} unparseable" + (f" (rows {report['unparseable_rows']})" if report["unparseable"] else ""))
    top = max(report["histogram"].values()) or 1
    for band, count in report["histogram"].items():
        click.echo(f"{band:>7} {'#' * round(30 * count / top):30s} {count}")
    click.echo(f"judged rows: {out}")


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{what} takes comma-separated whole numbers, like 16,64,256; got {text!r}") from None


@cli.command("sweep")
@click.option("--recipe", required=True, help="A bundled recipe name or a .yaml path.")
@click.option("--shots", default="16,64,256", show_default=True, help="Training rows K per run, comma-separated.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds per K (which K rows, and training), comma-separated.")
@click.option("--model", default=None, help="'builtin' (default), a local Hugging Face folder or a hub id.")
@click.option("--data", "data_source", default=None, help="A MIND folder, a .json/.jsonl/.csv file, or a folder of splits.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting in every run (repeatable).")
@click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path), help="Sweep folder (default runs/sweep-<recipe>).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]), help="Which backend trains and scores.")
def sweep_command(recipe, shots, seeds, model, data_source, overrides, out_dir, backend):
    """TALLRec's Table 1: a run per (K, seed) on K sampled rows, each scored by AUC on the same
    test split; prints mean ± std per K and writes sweep.md, sweep.json and sweep.png.

    Finished runs are reused only when their whole config matches (its hash names the folder).
    """
    from mlxft.backends import is_mlx_quantized, resolve_backend
    from mlxft.sweep import sweep

    settings = list(overrides) + ([f"model.name={model}"] if model else []) + ([f"data.source={data_source}"] if data_source else [])
    name = Path(recipe).stem
    out = out_dir or Path("runs") / f"sweep-{name}"
    report = sweep(recipe, _int_list(shots, "--shots"), _int_list(seeds, "--seeds"), settings, out,
                   backend=resolve_backend(backend, quantized=is_mlx_quantized(model)), echo=click.echo)
    click.echo((out / "sweep.md").read_text(), nl=False)
    click.echo(f"sweep folder: {out}")
    return report


@cli.command("plot")
@click.argument("run_folder", type=click.Path(path_type=Path))
@click.option("--out", default=None, type=click.Path(path_type=Path), help="PNG path (default RUN/metrics.png).")
def plot_command(run_folder, out):
    """Plot a run's metrics.jsonl: loss (training and validation), each eval metric, learning
    rate and tokens/s against the step, as one PNG."""
    from mlxft.eval.plots import plot_run

    click.echo(f"wrote {plot_run(run_folder, out)}")


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


def _mlx_only(backend: str, what: str) -> None:
    """fuse, generate, chat and serve run on MLX (auto picks it for them); the PyTorch backend has
    no token streaming yet."""
    from mlxft.errors import NotImplementedYet

    if backend == "torch":
        raise NotImplementedYet(f"{what} runs on the MLX backend only for now (the PyTorch backend has no token "
                                "streaming or weight merging yet); use --backend mlx, which runs on any Linux or macOS host")


_BACKEND_OPTION = click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]),
                               help="Which backend runs the model; MLX only for now, so auto means MLX here.")


@cli.command("fuse")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="An adapter folder (PEFT layout) or a run folder (its best/, else last/).")
@click.option("--model", default=None, help="Base model; default: the adapter's base_model_name_or_path.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the fused model.")
@click.option("--dequantize", is_flag=True, help="Full-precision output (the default for a quantized base; kept for mlx-lm users).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the fused model to 4 or 8 bits.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@_BACKEND_OPTION
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default).")
def fuse_command(adapter, model, out_dir, dequantize, quantize, force, backend, trust_remote_code):
    """Merge an adapter into its base model: a standalone Hugging Face folder that mlx-lm,
    transformers and mlxft load. A quantized base comes out de-quantized unless --quantize."""
    from mlxft.adapters import whole_model_folder

    _mlx_only(backend, "fuse")
    if dequantize and quantize:
        raise UserError("--dequantize and --quantize contradict each other; give one")
    whole = whole_model_folder(adapter)
    if whole is not None:
        click.echo(f"{whole} is already a whole model (full fine-tuning): nothing to fuse; use --model {whole}")
        return
    from mlxft.backends.mlx.fuse import fuse

    result = fuse(adapter, out_dir, model=model, quantize=int(quantize) if quantize else None, force=force,
                  trust_remote_code=trust_remote_code)
    precision = f"{result.quantization['bits']}-bit" if result.quantization else "full precision"
    click.echo(f"fused {result.merged_modules} modules of {adapter} into {result.base_model} ({precision}): {result.out}")
    click.echo(f"checked: the fused model's logits differ from base + adapter by {result.check['fused_vs_adapted']:.1e} "
               f"of the largest on a {result.check['probe_tokens']}-token probe" + (f" ({result.check['note']})" if "note" in result.check else ""))


@cli.group("export", cls=Group)
def export_group():
    """Write a model in another format (GGUF for llama.cpp and Ollama)."""


@export_group.command("gguf")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The .gguf file to write.")
@click.option("--type", "kind", type=click.Choice(["f16", "f32", "q8_0"]), default="f16", show_default=True,
              help="Weight type; norms stay f32.")
@click.option("--model", default=None, help="Base model of an adapter; default: the adapter's base_model_name_or_path.")
@click.option("--ollama", "ollama_name", default=None, help="Also write a Modelfile beside the file for `ollama create NAME`.")
def export_gguf_command(source, out, kind, model, ollama_name):
    """SOURCE (a model folder, a run, or an adapter: fused first) as one GGUF file, read back and
    checked against SOURCE's logits before it is kept."""
    from mlxft.export import describe, export_gguf

    if not out.name.endswith(".gguf"):
        raise UserError(f"--out {out}: name a .gguf file")
    click.echo(describe(export_gguf(source, out, kind, model=model, ollama_name=ollama_name, echo=click.echo)))


def _generation_options(function):
    """Options shared by generate, chat and serve: model, adapter, template and sampling."""
    options = [
        click.option("--model", default=None,
                     help="'builtin', a local Hugging Face folder (fused or not) or a hub id; default: the adapter's base model, else builtin."),
        click.option("--adapter", default=None, type=click.Path(path_type=Path), help="Apply an adapter (or a run folder's best/) without fusing."),
        click.option("--template", default="auto", show_default=True, type=click.Choice(["auto", "chat", "alpaca", "plain"]),
                     help="auto: the tokenizer's chat template if it has one, else alpaca (single-turn, instruction + optional input)."),
        _BACKEND_OPTION,
        click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _sampling_options(function):
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


def _sampling(temperature, top_p, top_k, max_tokens, seed, repetition_penalty):
    from mlxft.generation import Sampling

    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                    repetition_penalty=repetition_penalty)


def _load_generator(model, adapter, backend, trust_remote_code, what):
    _mlx_only(backend, what)
    from mlxft.backends.mlx.stream import load_generator

    return load_generator(model, adapter, trust_remote_code=trust_remote_code)


@cli.command("generate")
@_generation_options
@_sampling_options
@click.option("--prompt", required=True, help="The message (with --template alpaca: the instruction).")
@click.option("--input", "input_text", default="", help="Alpaca input that goes with the instruction.")
def generate_command(model, adapter, template, backend, trust_remote_code, system, temperature, top_p, top_k,
                     max_tokens, seed, repetition_penalty, prompt, input_text):
    """Answer one prompt, streaming the tokens as they come."""
    from mlxft.chat import stream_answer
    from mlxft.conversation import Conversation, resolve_template

    generator = _load_generator(model, adapter, backend, trust_remote_code, "generate")
    conversation = Conversation(resolve_template(template, generator.tokenizer), generator.tokenizer, system)
    sampling = _sampling(temperature, top_p, top_k, max_tokens, seed, repetition_penalty)
    stream_answer(generator, conversation.prompt(prompt, input_text), sampling, lambda text: click.echo(text, nl=False))
    click.echo()


@cli.command("chat")
@_generation_options
@_sampling_options
def chat_command(model, adapter, template, backend, trust_remote_code, system, temperature, top_p, top_k,
                 max_tokens, seed, repetition_penalty):
    """Talk with a model in the terminal; answers stream as they come. /reset, /input TEXT, /quit."""
    from mlxft.chat import run_chat
    from mlxft.conversation import Conversation, resolve_template

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    generator = _load_generator(model, adapter, backend, trust_remote_code, "chat")
    conversation = Conversation(resolve_template(template, generator.tokenizer), generator.tokenizer, system)
    run_chat(generator, conversation, _sampling(temperature, top_p, top_k, max_tokens, seed, repetition_penalty),
             read=input, write=lambda text: click.echo(text, nl=False))


@cli.command("serve")
@_generation_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; loopback keeps the server private to this machine.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port; 0 picks a free one.")
@click.option("--api-key", default=None, envvar="MLXFT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests (or set MLXFT_API_KEY).")
@click.option("--quiet", is_flag=True, help="Do not log each request.")
def serve_command(model, adapter, template, backend, trust_remote_code, host, port, api_key, quiet):
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a chat page at /."""
    from mlxft.serve.server import is_loopback, make_server

    generator = _load_generator(model, adapter, backend, trust_remote_code, "serve")
    try:
        server = make_server(generator, host=host, port=port, template=template, api_key=api_key,
                             log=None if quiet else (lambda line: click.echo(line, err=True)))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model", err=True)
    click.echo(f"serving {server.model_id} at {server.url} (chat page at /, OpenAI API at /v1); Ctrl-C stops", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


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


def _load_any(path: Path):
    """Rows from a file, or TALLRec rows from a MIND folder."""
    from mlxft.data.records import load_records

    if path.is_dir() and (path / "behaviors.tsv").exists():
        from mlxft.data.dataset import mind_records

        return mind_records(path)
    return load_records(path)


def main():
    from mlxft.blas import reexec_with_fast_blas

    reexec_with_fast_blas(sys.argv[1:])  # Linux: MLX's CPU products through OpenBLAS (see mlxft.blas)
    cli(prog_name="mlxft")


if __name__ == "__main__":
    main()
