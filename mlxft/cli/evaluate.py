"""`mlxft eval auc|rank|generate|judge|reward` and `mlxft plot`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlxft.cli.common import Group, cli, load_any, load_generator
from mlxft.errors import UserError


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
    from mlxft.backends import is_mlx_quantized, resolve_backend
    from mlxft.eval.yes_no import score_yes_no

    backend = resolve_backend(backend, quantized=is_mlx_quantized(model))
    positive, _, negative = answers.partition(",")
    if not negative:
        raise UserError("--answers takes two answers, like Yes.,No.")
    records = load_any(data_path)
    report = score_yes_no(backend, model, str(adapter) if adapter else None, records, template=template,
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

    from mlxft.backends import is_mlx_quantized, resolve_backend
    from mlxft.data.records import Record
    from mlxft.data.sources.mind import iter_impressions
    from mlxft.eval.ranking import ranking_report
    from mlxft.eval.yes_no import score_yes_no

    backend = resolve_backend(backend, quantized=is_mlx_quantized(model))
    impressions = list(itertools.islice(iter_impressions(mind_dir, max_history=max_history), max_impressions))
    records = [Record(row, f"{mind_dir}/behaviors.tsv impression {impression}")
               for impression, rows in impressions for row in rows]
    if not records:
        raise UserError(f"{mind_dir}: no impressions to rank")
    scored = score_yes_no(backend, model, str(adapter) if adapter else None, records, template=template,
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
    from mlxft.train.progress import Progress

    records = load_records(data_path)
    generator = load_generator(model, str(adapter) if adapter else None, backend, trust_remote_code, "eval generate")
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
    from mlxft.train.progress import Progress

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


@eval_group.command("reward")
@click.option("--model", default="builtin", show_default=True, help="The reward model's base: 'builtin', a local Hugging Face folder or a hub id.")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="A reward adapter (mlxft reward's best/ or last/, or PEFT SEQ_CLS).")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="{prompt, chosen, rejected} rows (.jsonl/.json) or a MIND folder.")
@click.option("--template", default="auto", show_default=True, help="The template the reward model was trained with.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs per forward pass.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]), help="Which backend runs the model.")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Write each pair's two scores here (.jsonl, file order).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default).")
def eval_reward(model, adapter, data_path, template, batch_size, backend, out, as_json, trust_remote_code):
    """Pairwise accuracy of a reward model: how often it scores the chosen answer above the
    rejected one (ties count half), with the mean margin and Bradley-Terry loss."""
    from mlxft.backends import is_mlx_quantized, resolve_backend
    from mlxft.files import write_atomic
    from mlxft.methods.reward import evaluate_pairs

    backend = resolve_backend(backend, quantized=is_mlx_quantized(model))
    report = evaluate_pairs(backend, model, str(adapter), data_path, template=template,
                            batch_size=batch_size, trust_remote_code=trust_remote_code)
    scores = report.pop("scores")
    if out:
        write_atomic(out, "".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r in scores))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"pairs {report['pairs']}: accuracy {report['accuracy']:.4f}, margin {report['margin']:.4f}, "
                   f"loss {report['loss']:.4f}")


@cli.command("plot")
@click.argument("run_folder", type=click.Path(path_type=Path))
@click.option("--out", default=None, type=click.Path(path_type=Path), help="PNG path (default RUN/metrics.png).")
def plot_command(run_folder, out):
    """Plot a run's metrics.jsonl: loss (training and validation), each eval metric, learning
    rate and tokens/s against the step, as one PNG."""
    from mlxft.eval.plots import plot_run

    click.echo(f"wrote {plot_run(run_folder, out)}")
