"""The adapter format's pure helpers, shared by both backends."""

import pytest

from mlxft.errors import UserError


def test_select_modules_is_one_pure_function_for_both_backends():
    from mlxft.adapters import select_modules

    modules = {f"model.layers.{i}.self_attn.{n}": (8, 8) for i in (0, 1, 10) for n in ("q_proj", "v_proj")}
    assert select_modules(modules, ["v_proj"], None) == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj", "model.layers.10.self_attn.v_proj"]
    assert select_modules(modules, ["q_proj", "v_proj"], [1]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(UserError, match="target module 'k_proj' is not in this model; its linear layers are: q_proj, v_proj"):
        select_modules(modules, ["k_proj"], None)
    with pytest.raises(UserError, match=r"layer 3 does not exist; this model has layers 0..2"):
        select_modules(modules, ["q_proj"], [3])


def test_target_presets_resolve_to_the_layer_names_of_each_part(tiny_model_dir):
    from mlxft.adapters import resolve_targets
    from mlxft.backends.mlx import lora
    from mlxft.backends.mlx import model as mlx_model

    model, _, _ = mlx_model.load(str(tiny_model_dir))
    modules = lora.linear_modules(model)
    assert resolve_targets("all-linear", modules) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert resolve_targets("attention", modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert resolve_targets("mlp", modules) == ["down_proj", "gate_proj", "up_proj"]
    assert resolve_targets(["q_proj"], modules) == ["q_proj"]
    gpt2_like = {"model.layers.0.attn.c_attn": (8, 8), "model.layers.0.attn.c_proj": (8, 8)}
    assert resolve_targets("attention", gpt2_like) == ["c_attn", "c_proj"]
    with pytest.raises(UserError, match="lora.target_modules=mlp: this model has no such linear layers; its blocks hold c_attn"):
        resolve_targets("mlp", gpt2_like)


def test_a_preset_or_a_list_from_the_command_line():
    from mlxft.config import load_config

    assert load_config("tallrec", ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"
    assert load_config("tallrec", ["lora.target_modules=[q_proj, k_proj]"]).lora.target_modules == ["q_proj", "k_proj"]
    with pytest.raises(UserError, match="lora.target_modules=everything: not a preset \\(all-linear, attention, mlp\\)"):
        load_config("tallrec", ["lora.target_modules=everything"])


def test_rslora_scales_by_the_root_of_the_rank_and_says_so_to_peft():
    from mlxft.adapters import AdapterSpec

    spec = AdapterSpec(r=16, alpha=32, dropout=0.0, target_modules=["q_proj"], base_model="m", use_rslora=True)
    assert spec.scaling == 8.0 and AdapterSpec(16, 32, 0.0, ["q_proj"], "m").scaling == 2.0
    config = spec.to_peft()
    assert config["use_rslora"] is True
    assert AdapterSpec.from_peft(config, "x").scaling == 8.0
    with pytest.raises(UserError, match="use_dora adapters are not supported yet"):
        AdapterSpec.from_peft({**config, "use_dora": True}, "x")
