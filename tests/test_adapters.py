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
