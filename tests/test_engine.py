"""The backend contract (mlxft.backends.engine): both engines keep every part of it with the same
parameters, so that a method written once runs on either."""

import inspect

import pytest

from mlxft.backends import engine_for
from mlxft.backends.engine import Engine


def contract() -> dict:
    """The Protocol's members: name -> the signature of a method, or None for an attribute."""
    members = {name: None for name in Engine.__annotations__}
    for name, value in vars(Engine).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            members[name] = None
        elif callable(value):
            members[name] = inspect.signature(value)
    return members


def parameters(signature: inspect.Signature) -> list[tuple[str, object]]:
    """(name, kind) of each parameter but self: what a caller can pass."""
    return [(p.name, p.kind) for p in signature.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_each_engine_keeps_the_whole_contract(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    engine = engine_for(backend)
    members = contract()
    assert len(members) > 30  # the contract as written, not an empty Protocol
    missing = [name for name in members if not hasattr(engine, name)]
    assert not missing, f"{backend} engine lacks {missing}"
    differ = {}
    for name, signature in members.items():
        if signature is None:
            continue
        theirs = inspect.signature(getattr(engine, name))
        if parameters(theirs) != parameters(signature):
            differ[name] = (parameters(signature), parameters(theirs))
    assert not differ, f"{backend} engine: parameters differ from the contract's: {differ}"
    assert engine.name == backend and isinstance(engine.pad_multiple, int) and isinstance(engine.device, str)


def test_a_missing_part_is_found():
    """Negative control: an engine without a step builder, or with a renamed parameter, fails the check."""

    class Partial:
        def sft_step(self, model, optimizer, config, *, split_head, world=None):
            pass

        def reward_step(self, model, optimizer, config, *, pad, world=None):  # pad, not pad_id
            pass

    members = contract()
    assert [name for name in ("sft_step", "pair_step") if not hasattr(Partial, name)] == ["pair_step"]
    ours = parameters(inspect.signature(Partial.reward_step))
    assert ours != parameters(members["reward_step"])
