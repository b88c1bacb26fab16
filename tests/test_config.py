import pytest

from mlxft.config import list_recipes, load_config
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
