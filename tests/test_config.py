import re

import pytest

from mlxft.config import dump_config, list_recipes, load_config, load_run_config
from mlxft.errors import UserError


def test_recipe_with_overrides():
    config = load_config("tallrec", ["train.steps=7", "lora.target_modules=[q_proj,k_proj]", "train.learning_rate=1e-3",
                                     "data.max_history=null"])
    assert config.recipe == "tallrec"
    assert config.train.steps == 7 and config.train.learning_rate == 0.001
    assert config.lora.target_modules == ["q_proj", "k_proj"]
    assert config.data.max_history is None
    assert config.data.template == "alpaca"  # from the recipe, untouched


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown setting 'train.stepz'"),
    ("trian.steps=3", "unknown setting 'trian'"),
    ("train.steps=many", "setting 'train.steps' must be int, got 'many'"),
    ("lora.r=", "setting 'lora.r' cannot be empty"),
    ("data=3", "'data' must be a section"),
    ("train=5", "'train' must be a section of keys, not a value; set one of its keys"),
    ("train.steps.x=1", "'train.steps' is a value, not a section"),
    ("train.steps=[1", "--set train.steps='\\[1': not valid YAML"),
    ("steps", "expected key.sub=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("'", "'")):
        load_config("tallrec", [override])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown recipe 'talrec'; the recipes are: .*tallrec"):
        load_config("talrec")


def test_every_bundled_recipe_loads_and_says_how_to_run_it():
    names = [name for name, _ in list_recipes()]
    assert {"tallrec", "alpaca-sft", "product-desc"} <= set(names)
    for name in names:
        config = load_config(name)
        assert config.recipe == name


def test_builtin_model_settings_apply_only_to_the_builtin_model():
    builtin = load_config("tallrec")
    assert builtin.lora.full_finetune and builtin.train.learning_rate == 2e-3
    real = load_config("tallrec", ["model.name=mlx-community/SmolLM-135M-Instruct-4bit"])
    assert not real.lora.full_finetune and real.train.learning_rate == 3e-4
    chosen = load_config("tallrec", ["train.learning_rate=1e-3"])
    assert chosen.train.learning_rate == 1e-3 and chosen.lora.full_finetune  # --set wins


@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be at least 1, got 0"),
    ("train.batch_size=0", "'train.batch_size' must be at least 1, got 0"),
    ("lora.r=0", "'lora.r' must be at least 1, got 0"),
    ("train.steps=-3", "'train.steps' must be at least 1, got -3"),
    ("train.steps=0", "'train.steps' must be at least 1, got 0"),  # it used to mean "one epoch", silently
    ("train.grad_accumulation=0", "at least 1"),
    ("train.learning_rate=-1e-3", "'train.learning_rate' must be at least 0"),
    ("train.learning_rate=.nan", "'train.learning_rate' must be a finite number, got nan"),
    ("train.learning_rate=1e999", "must be a finite number, got inf"),
    ("train.max_grad_norm=0", "'train.max_grad_norm' must be above 0"),
    ("train.epochs=0", "'train.epochs' must be above 0"),
    ("train.schedule=cosin", "'train.schedule' must be one of cosine, linear, constant"),
    ("train.min_learning_rate=1", "must not exceed train.learning_rate"),
    ("lora.dropout=1", "'lora.dropout' must be below 1"),
    ("lora.alpha=0", "'lora.alpha' must be above 0"),
    ("lora.layers=[0,-1]", "'lora.layers' must be at least 0, got -1"),
    ("lora.target_modules=[]", "must name at least one module"),
    ("data.cutoff=1", "'data.cutoff' must be at least 2"),
    ("data.split=[0,0,0]", "not all zero"),
    ("data.split=[0.5,0.5]", "three non-negative fractions"),
    ("data.split=[1,-1,0.5]", "'data.split' must be at least 0"),
    ("data.k_shot=0", "'data.k_shot' must be at least 1"),
    ("data.max_rows=0", "'data.max_rows' must be at least 1"),
    ("data.columns=[question]", "'data.columns' must be a mapping of names"),
    ("data.columns={instruction: ''}", "no name may be empty"),
    ("data.columns.instruction=question", "'data.columns' is one mapping; set it whole, like --set 'data.columns={instruction: ...}'"),
    ("data.streaming=true", "'data.streaming' applies to hf: sources"),
    ("eval.every=-1", "'eval.every' must be at least 0"),
    ("eval.metric=f1", "'eval.metric' must be one of loss, auc"),
    ("eval.answers=[Yes.]", "two different answers"),
    ("eval.answers=[Yes., Yes.]", "two different answers"),
    ("model.quantize=3", "'model.quantize' must be one of 4, 8"),
    ("dpo.beta=0", "'dpo.beta' must be above 0"),
    ("dpo.label_smoothing=0.5", "'dpo.label_smoothing' must be below 0.5"),
    ("dpo.support_ratio=1.5", "'dpo.support_ratio' must be at most 1"),
    ("dpo.max_length=100", "dpo.max_prompt_length (512) must be below dpo.max_length (100)"),
    ("train.report_to=[tensorboard, tensorboard]", "'train.report_to' names a sink twice"),
    ("train.report_to=[tensorboard, mlflow]", "'train.report_to' must be one of tensorboard, wandb, got 'mlflow'"),
])
def test_every_setting_is_range_checked_when_the_config_is_built(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config("tallrec", [override])


def test_the_edges_of_each_range_are_accepted():
    config = load_config("tallrec", ["train.learning_rate=0", "lora.dropout=0", "eval.every=0", "data.split=[1,0,0]",
                                     "train.steps=1", "train.warmup_steps=0", "dpo.label_smoothing=0.49",
                                     "model.quantize=8", "train.max_grad_norm=null", "train.steps=null", "train.epochs=0.5"])
    assert config.train.learning_rate == 0.0 and config.train.steps is None and config.train.epochs == 0.5


@pytest.mark.parametrize("value", ["Features: {features}", "Q: {question}\nA:", "a: b: c", "[not a list", "123", "yes"])
def test_set_keeps_a_text_setting_as_typed(value):
    # YAML would read these as a mapping, an error, a number or a boolean; a template is text.
    assert load_config("product-desc", [f"data.template={value}"]).data.template == value


def test_set_still_reads_yaml_where_it_means_something():
    config = load_config("tallrec", ["data.completion_field=null", "lora.target_modules=[q_proj, k_proj]",
                                     "data.system_prompt=You answer: yes or no"])
    assert config.data.completion_field is None and config.lora.target_modules == ["q_proj", "k_proj"]
    assert config.data.system_prompt == "You answer: yes or no"


def test_a_run_config_is_read_back_exactly_as_it_ran(tmp_path):
    # The recipe's builtin_model section must not be applied again over the run's own settings.
    chosen = load_config("tallrec", ["train.steps=40", "eval.every=0", "lora.full_finetune=false",
                                     "train.learning_rate=1e-3"])
    assert chosen.model.name == "builtin" and chosen.builtin_model  # the section is there, and was applied once
    (tmp_path / "config.yaml").write_text(dump_config(chosen))
    assert load_run_config(tmp_path / "config.yaml") == chosen
    # the negative control: read as a recipe, the section puts the recipe's values back
    as_recipe = load_config(str(tmp_path / "config.yaml"))
    assert (as_recipe.train.steps, as_recipe.eval.every, as_recipe.lora.full_finetune) == (300, 100, True)


def test_builtin_model_section_is_set_by_recipes_not_on_the_command_line():
    with pytest.raises(UserError, match="set the setting itself, like --set train.steps="):
        load_config("tallrec", ["builtin_model.train.steps=5"])
    with pytest.raises(UserError, match="'builtin_model' must be a section of settings"):
        load_config("tallrec", ["builtin_model=3"])
