"""`mlxft lora`, `mlxft dpo`, `mlxft reward`, `mlxft rl` and `mlxft sweep`: config -> runs.start -> the backend's trainer."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mlxft.cli.common import REPORT_TO_OPTION, cli, int_list, resolve_config, run_options
from mlxft.errors import UserError

NPROC = click.option("--nproc", default=1, show_default=True, type=click.IntRange(1, 256),
                     help="Data-parallel ranks on this machine, through mlx.launch (MLX) or torchrun (PyTorch).")


@cli.command("lora")
@run_options
@click.option("--resume", "resume_dir", default=None, type=click.Path(path_type=Path), help="Continue a stopped run from its last checkpoint.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="Start from an existing adapter (PEFT layout) instead of a new one.")
@NPROC
def lora_command(recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code, report_to, resume_dir, adapter, nproc):
    """Fine-tune with LoRA (or full fine-tuning: --set lora.full_finetune=true).

    Prints validation loss (and AUC for Yes/No data) before and after, and writes the run folder:
    config.yaml, metrics.jsonl, summary.json, best/ and last/ adapters, checkpoint/.
    """
    summary = _train("sft", recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code,
                     resume_dir, adapter, nproc, report_to)
    if summary:  # rank 0 of several, or the only process
        _print_outcome(summary)


def _train(method, recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code, resume_dir, adapter,
           nproc=1, report_to=None):
    """Check everything a user gave, then create (or resume) the run folder, hold it, and train.
    A mistake found before the first report leaves no run folder behind (see runs.start).
    Under mlx.launch or torchrun every rank runs this; --nproc N starts N ranks that way."""
    from mlxft.backends import is_mlx_quantized, resolve_backend
    from mlxft.methods import dpo, reward, rl, sft
    from mlxft.train import distributed, runs

    if resume_dir:
        if recipe or model or data_source or out_dir or quantize or adapter or report_to is not None:
            raise UserError("--resume continues a run with its own config.yaml; give no other settings "
                            "(--set may change only what a step's memory depends on: "
                            "train.memory_limit, train.grad_checkpoint, rl.completions_per_pass)")
        config = None
    else:
        if recipe is None:
            raise UserError(f"name a recipe: --recipe {dict(sft='tallrec', rl='grpo').get(method, method)} (see `mlxft recipes`)")
        config = resolve_config(recipe, model, data_source, out_dir, overrides, quantize, trust_remote_code, report_to)
        if adapter:
            _check_start_adapter(adapter, config)
        if config.data.packing and method != "sft":
            raise UserError(f"data.packing applies to SFT (mlxft lora); {method} rows keep their own layout")
        backend = resolve_backend(backend, quantized=bool(config.model.quantize) or is_mlx_quantized(config.model.name))
        distributed.check_fsdp(config, method, backend)
    launcher = distributed.launched_by()
    if resume_dir and backend == "auto":
        backend = launcher or _checkpoint_backend(resume_dir)
    if nproc > 1:
        if launcher:
            raise UserError(f"--nproc {nproc}: this process is already one of several ranks; drop --nproc")
        raise SystemExit(distributed.launch(backend, nproc, distributed.without_option(sys.argv[1:], "--nproc")))
    world = distributed.init(backend)
    if config is not None and config.train.fsdp and world.size < 2:  # a resumed run may go on in one process
        raise UserError("train.fsdp shards the weights across ranks; start several: --nproc 2 (or torchrun)")
    echo = click.echo if world.main else (lambda *a, **k: None)
    with runs.start(config, resume_dir, world, resume_overrides=list(overrides) if resume_dir else ()) as (config, run):
        if resume_dir:
            # A checkpoint holds one backend's optimizer state.
            written_by = run.checkpoint_state()["backend"]
            if backend not in ("auto", written_by):
                raise UserError(f"--resume {resume_dir}: its checkpoint was written by the {written_by} backend; "
                                f"resume it with --backend {written_by}")
            backend = resolve_backend(written_by)
        train = {"sft": sft.train, "dpo": dpo.train, "reward": reward.train, "rl": rl.train}[method]
        return train(config, run, backend=backend, resume=run.resumed, adapter=str(adapter) if adapter else None, echo=echo,
                     world=world)


def _checkpoint_backend(resume_dir: Path) -> str:
    """The backend that wrote a run's checkpoint (mlx when it does not say: the oldest runs)."""
    import json

    try:
        return json.loads((Path(resume_dir) / "checkpoint" / "state.json").read_text()).get("backend", "mlx")
    except (OSError, ValueError):
        return "auto"  # runs.start says what is wrong with the folder


def _check_start_adapter(adapter: Path, config) -> None:
    """--adapter continues a LoRA adapter: refuse what would silently ignore it."""
    from mlxft.models.adapters import adapter_folder

    if config.lora.full_finetune:
        why = " (the recipe's builtin_model section turns it on for the built-in model)" if config.builtin_model.get("lora.full_finetune") else ""
        raise UserError(f"--adapter continues a LoRA adapter, but this run is full fine-tuning (lora.full_finetune=true{why}); "
                        "add --set lora.full_finetune=false to train the adapter")
    adapter_folder(adapter)  # missing, a file, empty: said now, before a run folder exists


def _print_before_after(summary: dict, keys) -> None:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    for key in keys:
        if key in before and key in after:
            click.echo(f"validation {key[5:]}: {before[key]:.4f} -> {after[key]:.4f}")


def _print_outcome(summary: dict) -> None:
    _print_before_after(summary, ("eval_auc", "eval_loss"))
    if summary.get("generations"):
        for item in summary["generations"]:
            click.echo(f"--- {item['origin']}\nprompt: {item['prompt']!r}\nanswer: {item['answer']!r}\nexpected: {item['expected']!r}")
    click.echo(f"adapter: {summary['adapter']}")


@cli.command("dpo")
@run_options
@click.option("--resume", "resume_dir", default=None, type=click.Path(path_type=Path), help="Continue a stopped run from its last checkpoint.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path),
              help="Continue an existing adapter (PEFT layout, e.g. an SFT run's best/); it is also the reference.")
@NPROC
def dpo_command(recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code, report_to, resume_dir, adapter, nproc):
    """Direct preference optimisation on {prompt, chosen, rejected} pairs (or support/oppose rows
    with --set dpo.support_ratio=R).

    Losses (--set dpo.loss_type=...): sigmoid (DPO, default), ipo, hinge, robust, the
    reference-free simpo (--set dpo.simpo_gamma=G) and orpo (SFT on the chosen answer plus an
    odds-ratio term weighted by dpo.beta), and kto on unpaired {prompt, completion, label} rows
    (pairs are split into a desirable and an undesirable row; dpo.desirable_weight,
    dpo.undesirable_weight).

    The reference is the base model with the adapter switched off (no second copy of the
    weights), or the adapter it continues. Prints validation loss and reward accuracy before and
    after, and writes the run folder: config.yaml, metrics.jsonl (TRL's metric names),
    summary.json, best/ and last/ adapters, checkpoint/, and comparison.md / comparison.json
    with held-out answers before and after.
    """
    summary = _train("dpo", recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code,
                     resume_dir, adapter, nproc, report_to)
    if not summary:  # a rank other than 0: rank 0 reports
        return
    _print_before_after(summary, ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"))
    if summary.get("comparison"):
        comparison = summary["comparison"]
        click.echo(f"answers before and after: {comparison['markdown']}")
        empty = comparison.get("empty_answers") or {}
        if any(empty.values()):
            click.echo(f"warning: empty answers, {empty['before']} of {comparison['prompts']} before and {empty['after']} "
                       "after: is the template right for this model (data.template)?", err=True)
    click.echo(f"adapter: {summary['adapter']}")


@cli.command("reward")
@run_options
@click.option("--resume", "resume_dir", default=None, type=click.Path(path_type=Path), help="Continue a stopped run from its last checkpoint.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path),
              help="Start from an adapter (an SFT run's best/, or a reward adapter to continue).")
@NPROC
def reward_command(recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code, report_to, resume_dir, adapter, nproc):
    """Train a reward model on {prompt, chosen, rejected} pairs, or on a MIND folder (a clicked
    title preferred over a skipped one): a LoRA adapter and a scalar head, Bradley-Terry loss.

    Prints held-out pairwise accuracy and margin before and after, and writes the run folder:
    config.yaml, metrics.jsonl (TRL's metric names), summary.json, best/ and last/ adapters in
    PEFT's SEQ_CLS layout (AutoModelForSequenceClassification + PeftModel load them), checkpoint/.
    """
    summary = _train("reward", recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code,
                     resume_dir, adapter, nproc, report_to)
    if not summary:  # a rank other than 0: rank 0 reports
        return
    _print_before_after(summary, ("eval_loss", "eval_accuracy", "eval_margin"))
    click.echo(f"adapter: {summary['adapter']} (load with {summary['load_with']})")


@cli.command("rl")
@run_options
@click.option("--resume", "resume_dir", default=None, type=click.Path(path_type=Path), help="Continue a stopped run from its last checkpoint.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path),
              help="Start from an adapter (e.g. an SFT run's best/); needs rl.beta=0.")
def rl_command(recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code, report_to, resume_dir, adapter):
    """Online RL from prompts: GRPO (--set rl.loss_type=dr_grpo|dapo for its variants), RLOO
    (--set rl.algo=rloo) or PPO (--set rl.algo=ppo: a value head and GAE, as GIRL's RLHF). Each
    step samples rl.num_generations completions per prompt, scores them with the reward functions
    (rl.reward_functions: module:function or file.py:function, TRL's signature) and/or a reward
    model from `mlxft reward` (rl.reward_adapter, run on the same weights), and moves the adapter
    toward the better ones (rl.num_iterations updates per rollout), with a KL to the base model.

    Prints the held-out reward of greedy answers before and after, and writes the run folder:
    config.yaml, metrics.jsonl (TRL's metric names), completions.jsonl, summary.json, best/ and
    last/ adapters, checkpoint/.
    """
    summary = _train("rl", recipe, model, data_source, out_dir, overrides, quantize, backend, trust_remote_code,
                     resume_dir, adapter, report_to=report_to)
    if not summary:
        return
    before = summary.get("before") or {}
    _print_before_after(summary, [k for k in before if k.startswith("eval_reward")])
    click.echo(f"adapter: {summary['adapter']}")


@cli.command("sweep")
@click.option("--recipe", required=True, help="A bundled recipe name or a .yaml path.")
@click.option("--shots", default="16,64,256", show_default=True, help="Training rows K per run, comma-separated.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds per K (which K rows, and training), comma-separated.")
@click.option("--model", default=None, help="'builtin' (default), a local Hugging Face folder or a hub id.")
@click.option("--data", "data_source", default=None, help="A MIND folder, a .json/.jsonl/.csv file, a folder of splits, or hf:NAME[:CONFIG][@SPLIT].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting in every run (repeatable).")
@click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path), help="Sweep folder (default runs/sweep-<recipe>).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]), help="Which backend trains and scores.")
@REPORT_TO_OPTION
def sweep_command(recipe, shots, seeds, model, data_source, overrides, out_dir, backend, report_to):
    """TALLRec's Table 1: a run per (K, seed) on K sampled rows, each scored by AUC on the same
    test split; prints mean ± std per K and writes sweep.md, sweep.json and sweep.png.

    Finished runs are reused only when their whole config matches (its hash names the folder).
    """
    from mlxft.backends import is_mlx_quantized, resolve_backend
    from mlxft.methods.sweep import sweep
    from mlxft.train.report_to import parse_names

    settings = list(overrides) + ([f"model.name={model}"] if model else []) + ([f"data.source={data_source}"] if data_source else [])
    if report_to is not None:
        settings.append(f"train.report_to=[{', '.join(parse_names(report_to))}]")
    name = Path(recipe).stem
    out = out_dir or Path("runs") / f"sweep-{name}"
    report = sweep(recipe, int_list(shots, "--shots"), int_list(seeds, "--seeds"), settings, out,
                   backend=resolve_backend(backend, quantized=is_mlx_quantized(model)), echo=click.echo)
    click.echo((out / "sweep.md").read_text(), nl=False)
    click.echo(f"sweep folder: {out}")
    return report
