"""Typed run configuration, recipes (YAML files of data) and `--set key.sub=value` overrides.

A recipe holds the sections below; anything it leaves out takes the defaults here. Unknown keys,
in a recipe or in --set, are errors: a typo must never silently train with the default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlxft.errors import UserError
from mlxft.model_files import BUILTIN
from mlxft.resources import bundled


@dataclass
class ModelConfig:
    name: str = "builtin"  # 'builtin', a local Hugging Face folder, or a hub id
    quantize: int | None = None  # 4 or 8: quantize on load (QLoRA)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    source: str = "data/mind-sample"  # MIND folder, a .json/.jsonl/.csv file, or a folder of train/valid/test.jsonl
    template: str = "auto"  # auto, alpaca, phi3, chat, plain, or a format string with {column}s
    completion_field: str | None = None  # the answer's column, with a format string
    system_prompt: str | None = None
    cutoff: int = 512
    train_on_inputs: bool = False
    split: list[float] = field(default_factory=lambda: [0.85, 0.10, 0.05])
    seed: int = 0
    k_shot: int | None = None  # keep only K training rows (TALLRec's 16/64/256-shot runs)
    k_shot_seed: int | None = None  # which K rows (default: data.seed); the split stays data.seed's
    max_valid_rows: int | None = None  # evaluate on at most this many validation rows
    # MIND conversion
    max_history: int | None = None
    use_history: bool = False
    min_impressions: int = 5


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0  # scaling = alpha / r, as in PEFT
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None  # None: every block
    full_finetune: bool = False  # train every weight instead of an adapter


@dataclass
class TrainConfig:
    learning_rate: float = 3e-4
    schedule: str = "cosine"  # cosine, linear or constant, after warmup
    warmup_steps: int = 20
    min_learning_rate: float = 0.0
    weight_decay: float = 0.0
    # Adam's correction of its moments' zero start, as torch.optim.AdamW (PEFT, TRL) always does.
    # MLX's and so mlx-lm's default is off, which makes the first steps ~3x larger than the
    # learning rate says; measured on the tallrec recipe that decides whether a run learns at all.
    bias_correction: bool = True
    batch_size: int = 16
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    steps: int | None = 200  # optimizer steps; when None, `epochs` decides
    epochs: float | None = None
    seed: int = 0
    grad_checkpoint: bool = False
    report_every: int = 10
    checkpoint_every: int = 100


@dataclass
class EvalConfig:
    every: int = 50  # steps between validation runs (0: only before and after)
    metric: str = "loss"  # which validation metric picks the best adapter: loss or auc
    patience: int | None = None  # stop after this many evaluations without improvement
    answers: list[str] = field(default_factory=lambda: ["Yes.", "No."])  # positive first, for AUC
    batch_size: int = 32
    generate_examples: int = 0  # held-out rows to answer at the end (instruction recipes)
    max_new_tokens: int = 64


@dataclass
class DPOConfig:
    """Direct preference optimisation (`mlxft dpo`); names and defaults follow TRL's DPOConfig."""

    beta: float = 0.1  # how far the policy may move from the reference
    loss_type: str = "sigmoid"  # sigmoid, ipo, hinge or robust (see mlxft.dpo_loss)
    label_smoothing: float = 0.0  # sigmoid and robust: the share of pairs assumed mislabelled
    max_length: int | None = 1024  # prompt + answer, in tokens
    max_prompt_length: int | None = 512
    truncation_mode: str = "keep_end"  # which end of a long prompt to keep: keep_end or keep_start
    average_log_prob: bool = False  # mean instead of sum of the answer's token log-probs (ipo: always)
    precompute_reference: bool = False  # reference log-probs once, cached in the run folder
    share_prompt: bool = True  # run each pair's prompt once for both answers (mlxft.data.shared_prompt)
    reference_adapter: str | None = None  # reference = base + this adapter (default: where training starts)
    support_ratio: float | None = None  # rows {prompt, support, oppose}: the first ratio x N prefer support
    compare_prompts: str | None = None  # .json/.jsonl of {prompt} rows answered before and after

    def check(self) -> None:
        from mlxft.dpo_loss import check_loss_settings

        try:
            check_loss_settings(self.loss_type, self.beta, self.label_smoothing)
        except ValueError as e:
            raise UserError(f"dpo.{e}") from None
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise UserError(f"dpo.truncation_mode must be keep_end or keep_start, not {self.truncation_mode!r}")
        if self.max_length is not None and self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise UserError(f"dpo.max_prompt_length ({self.max_prompt_length}) must be below dpo.max_length "
                            f"({self.max_length}) to leave room for the answers")


@dataclass
class RunConfig:
    recipe: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    out: str | None = None  # run folder; default runs/<recipe>-<time>
    # Settings for the built-in model only ({"train.learning_rate": 5e-3, ...}): a tiny model
    # trained from scratch needs other settings than a pre-trained one; --set still wins.
    builtin_model: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipes_dir() -> Path:
    return bundled("recipes")


def list_recipes() -> list[tuple[str, str]]:
    """(name, first line of the header comment) for every bundled recipe."""
    found = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        found.append((path.stem, first))
    return found


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"recipe {name_or_path}: no such file")
        return path
    path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(name for name, _ in list_recipes())
        raise UserError(f"unknown recipe '{name_or_path}'; the recipes are: {names} (or a path to a .yaml file)")
    return path


def load_config(recipe: str | None, overrides: list[str] = ()) -> RunConfig:
    """A recipe (name or .yaml path, or None for the defaults) with --set overrides applied."""
    values = {}
    if recipe is not None:
        path = recipe_path(recipe)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        values.setdefault("recipe", path.stem)
    given = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key.sub=value, like train.steps=100")
        given.add(key.strip())
        _set_path(values, key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None, item)
    if values.get("model", {}).get("name", ModelConfig.name) == BUILTIN:
        for key, value in (values.get("builtin_model") or {}).items():
            if key not in given:
                _set_path(values, key.split("."), value, f"builtin_model: {key}")
    return _build(RunConfig, values, "")


def _set_path(values: dict, keys: list[str], value, item: str) -> None:
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {item!r}: '{key}' is a value, not a section")
    node[keys[-1]] = value


def _build(cls, values, prefix: str):
    if not isinstance(values, dict):
        raise UserError(f"'{prefix.rstrip('.')}' must be a section of keys, not {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown setting '{prefix}{unknown[0]}'; known in this section: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    """Check a YAML value against a field's annotation; ints are accepted where floats are."""
    value = _yaml11_float(value)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"setting '{key}' cannot be empty")
    for option in options:
        origin = typing.get_origin(option)
        if origin is list:
            (item_type,) = typing.get_args(option)
            items = value if isinstance(value, list) else [value]
            if all(_fits(v, item_type) for v in items):
                return [float(v) if item_type is float else v for v in items]
        elif option is not type(None) and _fits(value, option):
            return float(value) if option is float else value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise UserError(f"setting '{key}' must be {expected}, got {value!r}")


def _yaml11_float(value):
    # YAML 1.1 reads "1e-3" (no dot) as a string; everyone writes learning rates that way.
    if isinstance(value, str):
        try:
            return float(value) if any(c.isdigit() for c in value) and "e" in value.lower() else value
        except ValueError:
            return value
    if isinstance(value, list):
        return [_yaml11_float(v) for v in value]
    return value


def _fits(value, typ) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
