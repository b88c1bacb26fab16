"""Typed run configuration, recipes (YAML files of data) and `--set key.sub=value` overrides.

A recipe holds the sections below; anything it leaves out takes the defaults here. Unknown keys,
in a recipe or in --set, are errors: a typo must never silently train with the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlxft.data.sources.hub import is_hub
from mlxft.errors import UserError
from mlxft.models.files import BUILTIN
from mlxft.resources import bundled
from mlxft.settings import Given, build, check_key, read_yaml, set_path, setting
from mlxft.train.report_to import REPORT_TO


@dataclass
class ModelConfig:
    name: str = "builtin"  # 'builtin', a local Hugging Face folder, or a hub id
    quantize: int | None = setting(None, choices=(4, 8))  # quantize on load (QLoRA)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    source: str = "data/mind-sample"  # MIND folder, a .json/.jsonl/.csv file, a folder of train/valid/test.jsonl, or hf:NAME[:CONFIG][@SPLIT]
    columns: dict[str, str] | None = None  # the field mlxft reads -> the column holding it: {instruction: question, output: answer}
    max_rows: int | None = setting(None, low=1)  # read at most this many rows (of each split the source has)
    streaming: bool | None = None  # hf: sources: read the rows as they arrive, not the whole data set first; null: when data.max_rows is set
    template: str = "auto"  # auto, alpaca, phi3, chat, plain, or a format string with {column}s
    completion_field: str | None = None  # the answer's column, with a format string
    system_prompt: str | None = None
    cutoff: int = setting(512, low=2)  # a prompt token and an answer token at least
    train_on_inputs: bool = False
    packing: bool = False  # SFT: several examples in a row of data.cutoff tokens, each attending only to itself
    # packed rows' width (null: data.cutoff); attention runs over a whole row, so narrower rows cost less of it
    packing_length: int | None = setting(None, low=2)
    # a chat row's assistant turns that are scored: all of them (TRL's assistant_only_loss), or the last
    assistant_turns: str = setting("all", choices=("all", "last"))
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
        if any(not name.strip() for pair in (self.columns or {}).items() for name in pair):
            raise UserError(f"setting 'data.columns' maps fields to columns, like {{instruction: question}}; no name may be "
                            f"empty, got {self.columns}")
        if self.streaming and not is_hub(self.source):
            raise UserError(f"setting 'data.streaming' applies to hf: sources (Hugging Face data sets), not to {self.source}")


@dataclass
class LoraConfig:
    r: int = setting(8, low=1)
    alpha: float = setting(16.0, above=0.0)  # scaling = alpha / r, as in PEFT
    dropout: float = setting(0.05, low=0.0, below=1.0)
    # layer names, or a preset: all-linear (every linear layer of the blocks), attention, mlp
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # str first: a preset stays one
    use_rslora: bool = False  # rank-stabilised LoRA (PEFT's use_rslora): scaling = alpha / sqrt(r)
    use_dora: bool = False  # DoRA (PEFT's use_dora): a trained magnitude per output row rescales W + scaling * B @ A
    layers: list[int] | None = setting(None, low=0)  # None: every block
    full_finetune: bool = False  # train every weight instead of an adapter

    def check(self) -> None:
        from mlxft.models.adapters import TARGET_PRESETS

        if isinstance(self.target_modules, str):
            if self.target_modules not in TARGET_PRESETS:
                raise UserError(f"lora.target_modules={self.target_modules}: not a preset ({', '.join(TARGET_PRESETS)}); "
                                f"name layers as a list, like [q_proj, v_proj]")
        elif not self.target_modules or not all(self.target_modules):
            raise UserError("setting 'lora.target_modules' must name at least one module, like [q_proj, v_proj], "
                            "or be a preset: all-linear, attention, mlp")
        if self.layers is not None and not self.layers:
            raise UserError("setting 'lora.layers' must list at least one block index, or be null for every block")


@dataclass
class TrainConfig:
    learning_rate: float = setting(3e-4, low=0.0)  # 0 freezes the weights: a control run (check_first_step=false)
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
    # Shard the weights, gradients and optimizer state of a full fine-tune across the ranks
    # (PyTorch's FSDP2 fully_shard, under torchrun or --nproc; mlxft.backends.torch.engine), for a
    # model whose full fine-tune does not fit one device. MLX's ranks each hold the whole model.
    fsdp: bool = False
    # Scored positions the LM head runs on at a time, so that no step holds logits for all of
    # them (MLX; mlxft.backends.mlx.model.token_scores); null: sized by the vocabulary (a chunk's
    # float32 logits ~128 MB); 0: all positions at once.
    head_chunk: int | None = setting(None, low=0)
    # Stop after the first steps unless every trainable tensor got a finite, non-zero gradient and
    # changed (mlxft.train.first_step); false for a control run that trains nothing on purpose.
    check_first_step: bool = True
    report_every: int = setting(10, low=1)
    checkpoint_every: int = setting(100, low=1)
    # Share of the device's memory (Metal: the recommended working set; CUDA: the GPU's; CPU: the
    # machine's) the run's peak may pass before it stops with its checkpoint written, rather than
    # swap; null: no guard.
    memory_limit: float | None = setting(0.9, above=0.0, high=1.0)
    # Where every report goes besides metrics.jsonl (--report-to; mlxft.train.report_to): [] is none
    report_to: list[str] = setting([], choices=REPORT_TO)

    def check(self) -> None:
        if len(set(self.report_to)) != len(self.report_to):
            raise UserError(f"setting 'train.report_to' names a sink twice: {self.report_to}")
        if self.min_learning_rate > self.learning_rate:
            raise UserError(f"setting 'train.min_learning_rate' ({self.min_learning_rate:g}) must not exceed "
                            f"train.learning_rate ({self.learning_rate:g})")


# Which validation metrics can pick the best adapter (DPO's are reward accuracy and margin), and
# which of them are better higher (mlxft.train.driver.track_best).
HIGHER_IS_BETTER = ("auc", "accuracy", "margin", "reward", "rewards/accuracies", "rewards/margins")
EVAL_METRICS = ("loss", *HIGHER_IS_BETTER)


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
    loss_type: str = "sigmoid"  # sigmoid, ipo, hinge, robust; simpo, orpo (no reference); kto (unpaired rows) (see mlxft.losses.dpo)
    label_smoothing: float = setting(0.0, low=0.0, below=0.5)  # sigmoid and robust: the share of pairs assumed mislabelled
    simpo_gamma: float = setting(0.5, low=0.0)  # simpo: the target reward margin (TRL's CPOConfig.simpo_gamma)
    desirable_weight: float = setting(1.0, above=0.0)  # kto: the weight of desirable rows' losses (TRL's KTOConfig)
    undesirable_weight: float = setting(1.0, above=0.0)  # kto: the weight of undesirable rows' losses
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
        from mlxft.losses.dpo import check_loss_settings

        try:
            check_loss_settings(self.loss_type, self.beta, self.label_smoothing)
        except ValueError as e:
            raise UserError(f"dpo.{e}") from None
        if self.max_length is not None and self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise UserError(f"dpo.max_prompt_length ({self.max_prompt_length}) must be below dpo.max_length "
                            f"({self.max_length}) to leave room for the answers")


@dataclass
class RewardConfig:
    """A reward model (`mlxft reward`, mlxft.methods.reward); names and defaults follow TRL's RewardConfig."""

    max_length: int | None = setting(1024, low=2)  # prompt + answer, in tokens
    max_prompt_length: int | None = setting(512, low=1)
    truncation_mode: str = setting("keep_end", choices=("keep_end", "keep_start"))  # which end of a long prompt to keep
    center_coefficient: float = setting(0.0, low=0.0)  # TRL's center_rewards_coefficient: keeps rewards near 0

    def check(self) -> None:
        if self.max_length is not None and self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise UserError(f"reward.max_prompt_length ({self.max_prompt_length}) must be below reward.max_length "
                            f"({self.max_length}) to leave room for the answers")


@dataclass
class RLConfig:
    """Online RL from prompts (`mlxft rl`, mlxft.methods.rl); names and defaults follow TRL's GRPOConfig."""

    # group-normalised or leave-one-out advantages, or PPO's: GAE from a value head on the policy
    algo: str = setting("grpo", choices=("grpo", "rloo", "ppo"))
    loss_type: str = setting("grpo", choices=("grpo", "dr_grpo", "dapo"))  # how token losses are averaged
    num_generations: int = setting(4, low=1)  # G: completions sampled per prompt (grpo and rloo: at least 2)
    num_iterations: int = setting(1, low=1)  # updates on each rollout batch (TRL's num_iterations; PPO's epochs)
    max_prompt_length: int | None = setting(512, low=1)  # longer prompts keep their end, and are counted
    max_completion_length: int = setting(64, low=1)
    temperature: float = setting(1.0, above=0.0)  # sampling the completions
    top_p: float = setting(1.0, above=0.0, high=1.0)
    beta: float = setting(0.04, low=0.0)  # weight of the KL to the reference (the base, adapter off)
    epsilon: float = setting(0.2, above=0.0, below=1.0)  # the policy ratio's clip range, below 1
    epsilon_high: float | None = setting(None, above=0.0)  # above 1 (DAPO's clip-higher); default epsilon
    scale_rewards: bool = True  # divide advantages by the group's reward std (Dr. GRPO: false)
    reward_functions: list[str] = field(default_factory=lambda: ["mlxft.rewards:arithmetic"])  # module:function or file.py:function
    reward_adapter: str | None = None  # a reward model (mlxft reward) on this base: its score is one more reward, 'reward_model'
    reward_weights: list[float] | None = None  # one per function (then the reward model); default 1 each
    log_completions_every: int = setting(10, low=0)  # steps between samples in completions.jsonl (0: never)
    # completions per forward and backward pass when training on a rollout (null: all of a
    # micro-batch at once); fewer hold fewer activations, and the gradient is the same
    completions_per_pass: int | None = setting(4, low=1)
    # PPO only (TRL's PPOConfig names and defaults); there rl.beta weighs the KL in the per-token reward
    vf_coef: float = setting(0.1, low=0.0)  # weight of the value loss
    cliprange_value: float = setting(0.2, above=0.0)  # how far a value may move from its rollout value
    gamma: float = setting(1.0, low=0.0, high=1.0)  # discount over completion tokens
    lam: float = setting(0.95, low=0.0, high=1.0)  # GAE's lambda

    def check(self) -> None:
        rewards = len(self.reward_functions) + bool(self.reward_adapter)
        if self.reward_weights is not None and len(self.reward_weights) != rewards:
            raise UserError(f"rl.reward_weights has {len(self.reward_weights)} weights for {rewards} "
                            f"reward{'s' if rewards != 1 else ''}; give one per reward function"
                            + (", then one for the reward model" if self.reward_adapter else ""))
        if not rewards:
            raise UserError("no rewards: name a function in rl.reward_functions (like mlxft.rewards:arithmetic) "
                            "or a reward model in rl.reward_adapter")
        if self.algo != "ppo" and self.num_generations < 2:
            raise UserError(f"rl.algo={self.algo} compares completions of one prompt: rl.num_generations must be at "
                            f"least 2, got {self.num_generations} (rl.algo=ppo learns a baseline and may sample one)")


@dataclass
class RunConfig:
    recipe: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
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
    values = {}
    if recipe is not None:
        path = recipe_path(recipe)
        values = read_yaml(path, "recipe")
        values.setdefault("recipe", path.stem)
    given = apply_overrides(values, overrides)
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
                check_key(RunConfig, keys, f"builtin_model: {key}")
                set_path(values, keys, value)
    return build(RunConfig, values, "")


def apply_overrides(values: dict, overrides: list[str], allowed: set[str] | None = None) -> set[str]:
    """Put `--set key.sub=value` items into `values` (checked against RunConfig, and against
    `allowed` where given); returns the keys set."""
    given = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key.sub=value, like train.steps=100")
        keys = key.split(".")
        check_key(RunConfig, keys, item)
        if allowed is not None and key not in allowed:
            raise UserError(f"--set {item!r}: --resume continues a run with its own config.yaml; only "
                            f"{', '.join(sorted(allowed))} may change (they change memory, not the numbers)")
        given.add(key)
        set_path(values, keys, Given(raw))
    return given


# What a resumed run may change: how much memory a step takes, never what it computes.
RESUME_SETTINGS = {"train.memory_limit", "train.grad_checkpoint", "rl.completions_per_pass"}


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The config.yaml of a run, exactly as that run was started: it is already resolved, so the
    recipe's `builtin_model:` settings are not applied again over what --set chose then. On
    --resume, `overrides` may change the RESUME_SETTINGS."""
    values = read_yaml(Path(path), "run config")
    apply_overrides(values, overrides, RESUME_SETTINGS)
    return build(RunConfig, values, "")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
