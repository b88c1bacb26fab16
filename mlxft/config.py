"""Typed run configuration, recipes (YAML files of data) and `--set key.sub=value` overrides.

A recipe holds the sections below; anything it leaves out takes the defaults here. Unknown keys,
in a recipe or in --set, are errors: a typo must never silently train with the default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlxft.errors import UserError
from mlxft.model_files import BUILTIN
from mlxft.resources import bundled


def setting(default, *, low=None, high=None, above=None, below=None, choices=None):
    """A field with the range or choices its values must keep; checked whenever a config is built.

    low/high are inclusive bounds, above/below exclusive ones. Floats must also be finite."""
    rules = {k: v for k, v in dict(low=low, high=high, above=above, below=below, choices=choices).items() if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class ModelConfig:
    name: str = "builtin"  # 'builtin', a local Hugging Face folder, or a hub id
    quantize: int | None = setting(None, choices=(4, 8))  # quantize on load (QLoRA)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    source: str = "data/mind-sample"  # MIND folder, a .json/.jsonl/.csv file, or a folder of train/valid/test.jsonl
    template: str = "auto"  # auto, alpaca, phi3, chat, plain, or a format string with {column}s
    completion_field: str | None = None  # the answer's column, with a format string
    system_prompt: str | None = None
    cutoff: int = setting(512, low=2)  # a prompt token and an answer token at least
    train_on_inputs: bool = False
    split: list[float] = setting([0.85, 0.10, 0.05], low=0.0)
    seed: int = setting(0, low=0)
    k_shot: int | None = setting(None, low=1)  # keep only K training rows (TALLRec's 16/64/256-shot runs)
    k_shot_seed: int | None = setting(None, low=0)  # which K rows (default: data.seed); the split stays data.seed's
    max_valid_rows: int | None = setting(None, low=1)  # evaluate on at most this many validation rows
    # MIND conversion
    max_history: int | None = setting(None, low=1)
    use_history: bool = False
    min_impressions: int = setting(5, low=2)  # the last impression is the target; one before it at least

    def check(self) -> None:
        if len(self.split) != 3 or sum(self.split) <= 0:
            raise UserError(f"setting 'data.split' must be three non-negative fractions (train, valid, test) "
                            f"that are not all zero, got {self.split}")


@dataclass
class LoraConfig:
    r: int = setting(8, low=1)
    alpha: float = setting(16.0, above=0.0)  # scaling = alpha / r, as in PEFT
    dropout: float = setting(0.05, low=0.0, below=1.0)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = setting(None, low=0)  # None: every block
    full_finetune: bool = False  # train every weight instead of an adapter

    def check(self) -> None:
        if not self.target_modules or not all(self.target_modules):
            raise UserError("setting 'lora.target_modules' must name at least one module, like [q_proj, v_proj]")
        if self.layers is not None and not self.layers:
            raise UserError("setting 'lora.layers' must list at least one block index, or be null for every block")


@dataclass
class TrainConfig:
    learning_rate: float = setting(3e-4, low=0.0)  # 0 freezes the weights: a control run
    schedule: str = setting("cosine", choices=("cosine", "linear", "constant"))  # after warmup
    warmup_steps: int = setting(20, low=0)
    min_learning_rate: float = setting(0.0, low=0.0)
    weight_decay: float = setting(0.0, low=0.0)
    # Adam's correction of its moments' zero start, as torch.optim.AdamW (PEFT, TRL) always does.
    # MLX's and so mlx-lm's default is off, which makes the first steps ~3x larger than the
    # learning rate says; measured on the tallrec recipe that decides whether a run learns at all.
    bias_correction: bool = True
    batch_size: int = setting(16, low=1)
    grad_accumulation: int = setting(1, low=1)
    max_grad_norm: float | None = setting(1.0, above=0.0)
    steps: int | None = setting(200, low=1)  # optimizer steps; when None, `epochs` decides
    epochs: float | None = setting(None, above=0.0)  # when steps is None; default 1
    seed: int = setting(0, low=0)
    grad_checkpoint: bool = False
    report_every: int = setting(10, low=1)
    checkpoint_every: int = setting(100, low=1)

    def check(self) -> None:
        if self.min_learning_rate > self.learning_rate:
            raise UserError(f"setting 'train.min_learning_rate' ({self.min_learning_rate:g}) must not exceed "
                            f"train.learning_rate ({self.learning_rate:g})")


# Which validation metrics can pick the best adapter (DPO's are reward accuracy and margin).
EVAL_METRICS = ("loss", "auc", "accuracy", "rewards/accuracies", "rewards/margins")


@dataclass
class EvalConfig:
    every: int = setting(50, low=0)  # steps between validation runs (0: only before and after)
    metric: str = setting("loss", choices=EVAL_METRICS)  # which validation metric picks the best adapter
    patience: int | None = setting(None, low=1)  # stop after this many evaluations without improvement
    answers: list[str] = field(default_factory=lambda: ["Yes.", "No."])  # positive first, for AUC
    batch_size: int = setting(32, low=1)
    generate_examples: int = setting(0, low=0)  # held-out rows to answer at the end (instruction recipes)
    max_new_tokens: int = setting(64, low=1)

    def check(self) -> None:
        if len(self.answers) != 2 or not all(a.strip() for a in self.answers) or self.answers[0] == self.answers[1]:
            raise UserError(f"setting 'eval.answers' must be two different answers, positive first, like "
                            f"['Yes.', 'No.'], got {self.answers}")


@dataclass
class DPOConfig:
    """Direct preference optimisation (`mlxft dpo`); names and defaults follow TRL's DPOConfig."""

    beta: float = setting(0.1, above=0.0)  # how far the policy may move from the reference
    loss_type: str = "sigmoid"  # sigmoid, ipo, hinge or robust (see mlxft.dpo_loss)
    label_smoothing: float = setting(0.0, low=0.0, below=0.5)  # sigmoid and robust: the share of pairs assumed mislabelled
    max_length: int | None = setting(1024, low=2)  # prompt + answer, in tokens
    max_prompt_length: int | None = setting(512, low=1)
    truncation_mode: str = setting("keep_end", choices=("keep_end", "keep_start"))  # which end of a long prompt to keep
    average_log_prob: bool = False  # mean instead of sum of the answer's token log-probs (ipo: always)
    precompute_reference: bool = False  # reference log-probs once, cached in the run folder
    share_prompt: bool = True  # run each pair's prompt once for both answers (mlxft.data.shared_prompt)
    reference_adapter: str | None = None  # reference = base + this adapter (default: where training starts)
    support_ratio: float | None = setting(None, low=0.0, high=1.0)  # rows {prompt, support, oppose}: the first ratio x N prefer support
    compare_prompts: str | None = None  # .json/.jsonl of {prompt} rows answered before and after

    def check(self) -> None:
        from mlxft.dpo_loss import check_loss_settings

        try:
            check_loss_settings(self.loss_type, self.beta, self.label_smoothing)
        except ValueError as e:
            raise UserError(f"dpo.{e}") from None
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
    """A recipe (name or .yaml path, or None for the defaults) with --set overrides applied, and
    the recipe's `builtin_model:` settings when the model is the built-in one (--set still wins).
    Every setting is checked here, before anything is loaded or written."""
    values = _read_yaml(recipe_path(recipe), "recipe") if recipe is not None else {}
    if recipe is not None:
        values.setdefault("recipe", recipe_path(recipe).stem)
    given = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key.sub=value, like train.steps=100")
        keys = key.split(".")
        _check_key(keys, item)
        given.add(key)
        _set_path(values, keys, Given(raw))
    model = values.get("model")
    name = model.get("name", ModelConfig.name) if isinstance(model, dict) else None
    if (name.value(str, "model.name") if isinstance(name, Given) else name) == BUILTIN:
        overlay = values.get("builtin_model") or {}
        if isinstance(overlay, Given):
            overlay = overlay.value(dict, "builtin_model")
        if not isinstance(overlay, dict):
            raise UserError(f"setting 'builtin_model' must be a section of settings like "
                            f"{{train.learning_rate: 2.0e-3}}, not {overlay!r}")
        for key, value in overlay.items():
            if key not in given:
                keys = str(key).split(".")
                _check_key(keys, f"builtin_model: {key}")
                _set_path(values, keys, value)
    return _build(RunConfig, values, "")


def load_run_config(path: str | Path) -> RunConfig:
    """The config.yaml of a run, exactly as that run was started: it is already resolved, so the
    recipe's `builtin_model:` settings are not applied again over what --set chose then."""
    return _build(RunConfig, _read_yaml(Path(path), "run config"), "")


def _read_yaml(path: Path, what: str) -> dict:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if values is None:
        return {}
    _acyclic(values, f"{what} {path}")
    if not isinstance(values, dict):
        raise UserError(f"{what} {path}: expected sections of settings (model:, data:, train:, ...), not {type(values).__name__}")
    return values


class Given:
    """A --set value as typed. It is read as YAML (numbers, lists, null), except where the setting
    is text: there the typed text is kept when YAML would make something else of it, so a
    template such as 'Features: {features}' is a template, not a YAML mapping."""

    def __init__(self, raw: str):
        self.raw = raw

    def value(self, hint, key: str):
        options = _options(hint)
        if not self.raw.strip():
            return None
        try:
            parsed, error = yaml.safe_load(self.raw), None
        except yaml.YAMLError as e:
            parsed, error = None, str(e).splitlines()[0]
        if str in options and not (isinstance(parsed, str) and error is None or parsed is None and type(None) in options):
            return self.raw
        if error is not None:
            raise UserError(f"--set {key}={self.raw!r}: not valid YAML ({error})")
        return _acyclic(parsed, f"--set {key}")


def _acyclic(value, where: str, seen=()):
    """YAML's anchors can make a list that holds itself (&a [*a]); no setting is one."""
    if isinstance(value, (list, dict)):
        if id(value) in seen:
            raise UserError(f"{where}: a YAML alias refers to itself")
        for item in value.values() if isinstance(value, dict) else value:
            _acyclic(item, where, (*seen, id(value)))
    return value


def _options(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _check_key(keys: list[str], item: str) -> None:
    """A --set key names one setting: every part exists, and it ends on a value, not a section."""
    cls = RunConfig
    for depth, key in enumerate(keys):
        prefix = ".".join(keys[:depth])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise UserError(f"unknown setting '{prefix + '.' if prefix else ''}{key}'; known in this section: "
                            f"{', '.join(sorted(fields))}")
        hint = typing.get_type_hints(cls)[key]
        last = depth == len(keys) - 1
        if dataclasses.is_dataclass(hint):
            if last:
                example = next(iter(f.name for f in dataclasses.fields(hint)))
                raise UserError(f"--set {item!r}: '{'.'.join(keys)}' must be a section of keys, not a value; "
                                f"set one of its keys, like {'.'.join(keys)}.{example}=...")
            cls = hint
        elif hint is dict:
            if not last:  # builtin_model holds "section.key" names; --set names the setting itself
                raise UserError(f"--set {item!r}: builtin_model's settings are a recipe's; on the command line "
                                f"set the setting itself, like --set {'.'.join(keys[1:])}=...")
            return
        elif not last:
            raise UserError(f"--set {item!r}: '{'.'.join(keys[:depth + 1])}' is a value, not a section")


def _set_path(values: dict, keys: list[str], value) -> None:
    node = values
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):  # a recipe's scalar where a section belongs is replaced, and reported by _build
            child = node[key] = {} if child is None else child
            if not isinstance(child, dict):
                raise UserError(f"setting '{key}' must be a section of keys, not {child!r}")
        node = child
    node[keys[-1]] = value


def _build(cls, values, prefix: str):
    if not isinstance(values, dict):
        raise UserError(f"'{prefix.rstrip('.')}' must be a section of keys, not {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise UserError(f"unknown setting '{prefix}{unknown[0]}'; known in this section: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(value, Given):
            value = value.value(hint, f"{prefix}{name}")
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    built = cls(**kwargs)
    _check_ranges(built, prefix)
    if hasattr(built, "check"):
        built.check()
    return built


def _check_ranges(section, prefix: str) -> None:
    """Each setting within the range or among the choices its field declares; floats finite."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"setting '{prefix}{f.name}' must be a finite number, got {item}")
            if item is None or isinstance(item, (bool, str, dict)) and "choices" not in f.metadata:
                continue
            rules = f.metadata
            bounds = [("low", lambda x, b: x >= b, "at least"), ("high", lambda x, b: x <= b, "at most"),
                      ("above", lambda x, b: x > b, "above"), ("below", lambda x, b: x < b, "below")]
            for name, holds, words in bounds:
                if name in rules and not holds(item, rules[name]):
                    raise UserError(f"setting '{prefix}{f.name}' must be {words} {rules[name]:g}, got {item!r}")
            if "choices" in rules and item not in rules["choices"]:
                raise UserError(f"setting '{prefix}{f.name}' must be one of {', '.join(map(str, rules['choices']))}, "
                                f"got {item!r}")


def _coerce(value, hint, key: str):
    """Check a YAML value against a field's annotation; ints are accepted where floats are."""
    value = _yaml11_float(value)
    options = _options(hint)
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
                return [_float(v, key) if item_type is float else v for v in items]
        elif option is not type(None) and _fits(value, option):
            return _float(value, key) if option is float else value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise UserError(f"setting '{key}' must be {expected}, got {value!r}")


def _float(value, key: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer of 400 digits
        raise UserError(f"setting '{key}' must be a finite number, got an integer of {len(str(value))} digits") from None


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
