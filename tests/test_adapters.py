"""The adapter format's pure helpers, shared by both backends."""

import numpy as np
import pytest

from mlxft.errors import UserError


def test_select_modules_is_one_pure_function_for_both_backends():
    from mlxft.models.adapters import select_modules

    modules = {f"model.layers.{i}.self_attn.{n}": (8, 8) for i in (0, 1, 10) for n in ("q_proj", "v_proj")}
    assert select_modules(modules, ["v_proj"], None) == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj", "model.layers.10.self_attn.v_proj"]
    assert select_modules(modules, ["q_proj", "v_proj"], [1]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(UserError, match="target module 'k_proj' is not in this model; its linear layers are: q_proj, v_proj"):
        select_modules(modules, ["k_proj"], None)
    with pytest.raises(UserError, match=r"layer 3 does not exist; this model has layers 0..2"):
        select_modules(modules, ["q_proj"], [3])


def test_target_presets_resolve_to_the_layer_names_of_each_part(tiny_model_dir):
    from mlxft.backends.mlx import lora
    from mlxft.backends.mlx import model as mlx_model
    from mlxft.models.adapters import resolve_targets

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
    from mlxft.models.adapters import AdapterSpec

    spec = AdapterSpec(r=16, alpha=32, dropout=0.0, target_modules=["q_proj"], base_model="m", use_rslora=True)
    assert spec.scaling == 8.0 and AdapterSpec(16, 32, 0.0, ["q_proj"], "m").scaling == 2.0
    config = spec.to_peft()
    assert config["use_rslora"] is True
    assert AdapterSpec.from_peft(config, "x").scaling == 8.0


def test_a_dora_adapter_saves_its_magnitudes_under_peft_keys_and_needs_them(tmp_path):
    # PEFT's save names a DoRA layer's magnitude <module>.lora_magnitude_vector, [out], no ".weight".
    from safetensors.numpy import load_file

    from mlxft.models.adapters import AdapterSpec, load_adapter, save_adapter

    spec = AdapterSpec(2, 4, 0.0, ["q_proj"], "m", use_dora=True)
    assert spec.to_peft()["use_dora"] is True and AdapterSpec(2, 4, 0.0, ["q_proj"], "m").to_peft()["use_dora"] is False
    rng = np.random.default_rng(0)
    a, b, m = rng.normal(size=(2, 8)), rng.normal(size=(6, 2)), rng.uniform(1, 2, size=6)
    path = "model.layers.0.self_attn.q_proj"
    save_adapter(tmp_path / "dora", spec, {path: (a, b, m)})
    assert sorted(load_file(str(tmp_path / "dora/adapter_model.safetensors"))) == [
        f"base_model.model.{path}.{part}" for part in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")]
    loaded_spec, weights = load_adapter(tmp_path / "dora")
    assert loaded_spec.use_dora and np.allclose(weights[path][2], m) and np.allclose(weights[path][1], b)
    # A DoRA config whose layers lack a magnitude, and magnitudes under a plain LoRA config, are refused.
    save_adapter(tmp_path / "no-m", spec, {path: (a, b)})
    with pytest.raises(UserError, match="'model.layers.0.self_attn.q_proj' lacks its lora_magnitude_vector tensor"):
        load_adapter(tmp_path / "no-m")
    save_adapter(tmp_path / "lora", AdapterSpec(2, 4, 0.0, ["q_proj"], "m"), {path: (a, b, m)})
    with pytest.raises(UserError, match="a DoRA magnitude, but the config has no use_dora"):
        load_adapter(tmp_path / "lora")
