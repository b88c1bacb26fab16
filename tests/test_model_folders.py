"""A model folder written by transformers loads as the same model on both backends."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlxft.backends.mlx import model as mlx_model  # noqa: E402
from mlxft.backends.torch import model as torch_model  # noqa: E402
from mlxft.models.builtin import tokenizer_dir  # noqa: E402
from mlxft.models.files import mlx_config_overrides  # noqa: E402

IDS = [[1, 57, 300, 41, 990, 12, 7, 1500, 33, 600, 8, 2000, 5, 77, 120, 43]]


def save_llama(folder, tokenizer_folder, **config):
    torch.manual_seed(0)
    settings = dict(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config}))
    with torch.no_grad():  # larger than the default init, so a wrong rotation shows in the logits
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def both_logits(folder):
    model, _, _ = mlx_model.load(str(folder))
    mine = np.array(model(mx.array(IDS)))
    theirs, _, _ = torch_model.load(str(folder), device=torch.device("cpu"))
    with torch.no_grad():
        reference = theirs(torch.tensor(IDS)).logits.numpy()
    return mine, reference


@pytest.mark.parametrize("config", [
    {"rope_theta": 100000.0, "tie_word_embeddings": False},
    {"rope_theta": 500000.0, "tie_word_embeddings": True},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
])
def test_a_transformers_5_folder_gives_the_same_logits_on_mlx(builtin_tokenizer, tmp_path, config):
    folder = save_llama(tmp_path / "model", tokenizer_dir(), **config)
    written = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written  # transformers 5's layout
    mine, reference = both_logits(folder)
    assert np.abs(mine - reference).max() < 1e-4
    # the negative control: as mlx-lm reads the folder by itself, theta falls back to 10000
    from mlx_lm.utils import load as mlx_lm_load

    bare = np.array(mlx_lm_load(str(folder))[0](mx.array(IDS)))
    assert np.abs(bare - reference).max() > 1e-2


def test_overrides_leave_a_transformers_4_config_alone():
    assert mlx_config_overrides({"rope_theta": 1e4, "rope_scaling": None}) == {}
    assert mlx_config_overrides({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}) == {"rope_theta": 1e6}
    assert mlx_config_overrides({"rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0}}) == \
        {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
