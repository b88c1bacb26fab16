"""GGUF exports judged by llama.cpp itself (llama-cpp-python, the `llama-cpp` extra): tokenizer
families, architectures, the certificate, adapters, and what a failed check leaves behind."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install 'mlxft[llama-cpp]'")

from mlxft.errors import UserError  # noqa: E402
from mlxft.models.adapters import AdapterSpec, save_adapter  # noqa: E402
from mlxft.models.export import export_gguf  # noqa: E402
from mlxft.models.gguf import adapter as adapter_module  # noqa: E402
from mlxft.models.gguf import certify as certify_module  # noqa: E402
from mlxft.models.gguf import names  # noqa: E402
from mlxft.models.gguf.runtime import Runtime  # noqa: E402
from mlxft.models.gguf.vocab import LLAMA3, QWEN2, SPLIT_PROBES, pre_tokenizer  # noqa: E402
from mlxft.models.gguf.write import write_gguf  # noqa: E402

QUIET = {"echo": lambda *a: None}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
# Texts beyond the family probes: what a user's prompts hold.
MORE_TEXTS = ["What's 1234 + 5678? Don't explain.", "x = [1,2,3]\r\n\ty = 'it''s'", "   ", "\n\n\n", "Ünïcödé ÀÉÎ 😀😃"]


def bpe_tokenizer(folder: Path, pre, *, ignore_merges=False, clean_spaces=False):
    """A byte-level BPE trained here on a few kB of text, with `pre` as its pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = Path(__file__).with_name("test_gguf_llama_cpp.py").read_text() * 2 + " ".join(SPLIT_PROBES) * 20
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=clean_spaces)
    fast.save_pretrained(str(folder))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def split(expression):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(expression), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def byte_level_with_digits():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def gpt2_byte_level():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def random_model(folder: Path, model_type: str, vocab_size: int, **extra) -> "torch.nn.Module":
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    config = transformers.AutoConfig.for_model(model_type, **{**common, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:  # norms away from 1, so that a missing Gemma +1 or a swapped norm shows
                parameter.add_(torch.randn_like(parameter) * 0.1)
            elif "q_proj" in name or "k_proj" in name or "qkv_proj" in name:  # peaked attention: rotary layout shows
                parameter.mul_(8.0)
    model.save_pretrained(str(folder))
    return model.eval()


@pytest.mark.parametrize("family, pre, options", [
    ("llama-bpe", lambda: split(LLAMA3), {"ignore_merges": True}),
    ("qwen2", lambda: split(QWEN2), {}),
    ("smollm", byte_level_with_digits, {}),
    ("gpt-2", gpt2_byte_level, {"clean_spaces": True}),
])
def test_each_bpe_family_is_named_as_llama_cpp_names_it_and_tokenizes_alike_there(tmp_path, family, pre, options):
    tokenizer = bpe_tokenizer(tmp_path, pre(), **options)
    assert pre_tokenizer(tokenizer, json.loads((tmp_path / "tokenizer.json").read_text()), "m") == family
    random_model(tmp_path, "llama", len(tokenizer))
    write_gguf(tmp_path, tmp_path / "m.gguf", "f32")
    runtime = Runtime(tmp_path / "m.gguf", context=256)
    texts = [*SPLIT_PROBES, *MORE_TEXTS]
    different = [t for t in texts if runtime.tokenize(t, add_special=False) != tokenizer.encode(t, add_special_tokens=False)]
    runtime.close()
    assert different == []


def test_the_default_pre_tokenizer_would_have_tokenized_otherwise(tmp_path, monkeypatch):
    # The negative control of the test above: the file that mlxft wrote before naming the family.
    tokenizer = bpe_tokenizer(tmp_path, split(LLAMA3), ignore_merges=True)
    random_model(tmp_path, "llama", len(tokenizer))
    monkeypatch.setattr("mlxft.models.gguf.vocab.pre_tokenizer", lambda *a: "default")
    write_gguf(tmp_path, tmp_path / "m.gguf", "f32")
    runtime = Runtime(tmp_path / "m.gguf", context=256)
    texts = [*SPLIT_PROBES, *MORE_TEXTS]
    different = [t for t in texts if runtime.tokenize(t, add_special=False) != tokenizer.encode(t, add_special_tokens=False)]
    runtime.close()
    assert len(different) >= 3, different


def test_a_tokenizer_no_llama_cpp_family_matches_is_refused_in_one_line(tmp_path):
    # Splits at whitespace only, so merges cross punctuation: no family of llama.cpp cuts text like that.
    tokenizer = bpe_tokenizer(tmp_path, split(r"\S+|\s+"))
    with pytest.raises(UserError, match="splits text as none of llama.cpp's pre-tokenizers"):
        pre_tokenizer(tokenizer, json.loads((tmp_path / "tokenizer.json").read_text()), "m")
    # gpt-2's expressions, but decoding without gpt-2's clean-up of spaces: no family says that.
    other = tmp_path / "other"
    tokenizer = bpe_tokenizer(other, gpt2_byte_level(), clean_spaces=False)
    with pytest.raises(UserError, match="none of llama.cpp's pre-tokenizers"):
        pre_tokenizer(tokenizer, json.loads((other / "tokenizer.json").read_text()), "m")


ARCHITECTURES = {  # transformers model_type -> what a small model of it needs
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 32},
    "phi3": {"num_key_value_heads": 4, "pad_token_id": 0},
    # llama.cpp scales Gemma's queries by 1/sqrt(head_dim): the small model says the same.
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True},
}
# llama.cpp keeps the KV cache in f16 by default: that, not the weights, sets the f32 error (measured
# 3.0e-4 to 7.9e-4 over these architectures; f16 weights 7.2e-4 to 1.8e-3; benchmarks/RESULTS.md).
LOGITS_BOUND = {"f32": 2e-3, "f16": 3e-3}


def architecture_model(tmp_path, builtin_model, model_type):
    # Not named after the architecture: llama.cpp changes a phi-3 vocabulary's rules by general.name.
    folder = tmp_path / "small-model"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        if (builtin_model / name).exists():
            shutil.copy(builtin_model / name, folder / name)
    vocab = json.loads((builtin_model / "config.json").read_text())["vocab_size"]
    return random_model(folder, model_type, vocab, **ARCHITECTURES[model_type]), folder, vocab


@pytest.fixture
def builtin_model():
    from mlxft.models.builtin import tokenizer_dir

    return tokenizer_dir()


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_each_architecture_gives_transformers_logits_in_llama_cpp(tmp_path, builtin_model, model_type):
    model, folder, vocab = architecture_model(tmp_path, builtin_model, model_type)
    ids = [1, *np.random.default_rng(0).integers(3, vocab, 30).tolist()]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    for kind, bound in LOGITS_BOUND.items():
        write_gguf(folder, tmp_path / f"{kind}.gguf", kind)
        runtime = Runtime(tmp_path / f"{kind}.gguf", context=64)
        difference = np.abs(runtime.logits(ids) - reference).max() / np.abs(reference).max()
        runtime.close()
        assert difference < bound, (kind, difference)


@pytest.mark.parametrize("model_type, broken", [("llama", "reorders_qk"), ("gemma2", "norm_offset")])
def test_the_architecture_proof_fails_when_a_layout_rule_is_dropped(tmp_path, builtin_model, model_type, broken, monkeypatch):
    model, folder, vocab = architecture_model(tmp_path, builtin_model, model_type)
    arch = names.ARCHITECTURES[model_type]
    monkeypatch.setitem(names.ARCHITECTURES, model_type, names.Architecture(
        **{**arch.__dict__, broken: {"reorders_qk": False, "norm_offset": 0.0}[broken], "block_names": arch.block_names}))
    ids = [1, *np.random.default_rng(0).integers(3, vocab, 30).tolist()]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    write_gguf(folder, tmp_path / "f32.gguf", "f32")
    runtime = Runtime(tmp_path / "f32.gguf", context=64)
    difference = np.abs(runtime.logits(ids) - reference).max() / np.abs(reference).max()
    runtime.close()
    assert difference > 20 * LOGITS_BOUND["f32"], difference


def test_an_export_is_certified_in_llama_cpp_and_the_certificate_kept_beside_it(tiny_model_dir, tmp_path):
    out = tmp_path / "out" / "tiny.gguf"
    report = export_gguf(tiny_model_dir, out, "f16", ollama_name="tiny", **QUIET)
    certificate = json.loads((tmp_path / "out" / "tiny.certificate.json").read_text())
    assert certificate["passed"] and certificate == {**report["certificate"]}
    assert certificate["tokenizer"]["mismatches"] == [] and certificate["tokenizer"]["adds_bos"] is True
    assert certificate["greedy"]["prompts"] == 4 and certificate["logits"]["max_relative_difference"] < 6e-3
    assert (tmp_path / "out" / "Modelfile").read_text().startswith("FROM ./tiny.gguf\nTEMPLATE")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "tiny.certificate.json", "tiny.gguf"]


def test_a_failed_certificate_keeps_nothing_and_an_existing_file_needs_force(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "tiny.gguf"
    monkeypatch.setitem(certify_module.LOGIT_BOUND, "f16", 0.0)
    with pytest.raises(UserError, match="failed its certificate in llama.cpp, so nothing was kept: llama.cpp's logits differ"):
        export_gguf(tiny_model_dir, out, "f16", ollama_name="tiny", **QUIET)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out.write_bytes(b"someone's file")
    with pytest.raises(UserError, match="exists; add --force to replace it"):
        export_gguf(tiny_model_dir, out, "f32", **QUIET)
    assert out.read_bytes() == b"someone's file"
    export_gguf(tiny_model_dir, out, "f32", force=True, **QUIET)
    assert out.read_bytes()[:4] == b"GGUF"


def random_adapter(tiny_model_dir, folder, *, rslora=False, dora=False, modules_to_save=None):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    hidden, kv = config["hidden_size"], config["hidden_size"] * config["num_key_value_heads"] // config["num_attention_heads"]
    rng = np.random.default_rng(3)
    weights = {}
    for layer in range(config["num_hidden_layers"]):
        for name, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
            a, b = rng.normal(0, 0.15, (4, hidden)), rng.normal(0, 0.15, (out, 4))
            weights[f"model.layers.{layer}.self_attn.{name}"] = (a, b, np.ones(out)) if dora else (a, b)
    spec = AdapterSpec(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"], base_model=str(tiny_model_dir),
                       use_rslora=rslora, use_dora=dora, modules_to_save=modules_to_save)
    extra = {"score.weight": np.zeros((1, hidden))} if modules_to_save else None
    return save_adapter(folder, spec, weights, extra)


@pytest.mark.parametrize("rslora", [False, True])
def test_an_adapter_alone_runs_under_lora_in_llama_cpp_as_mlxft_runs_it(tiny_model_dir, tmp_path, rslora):
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", rslora=rslora)
    report = export_gguf(adapter, tmp_path / "a.gguf", adapter_only=True, **QUIET)
    assert report["tensors"] == 12 and report["alpha"] == pytest.approx(8.0 * (2.0 if rslora else 1.0))  # sqrt(4) = 2
    certificate = report["certificate"]
    assert certificate["passed"] and certificate["lora"] and certificate["logits"]["max_relative_difference"] < 2.5e-3


def test_an_adapter_with_the_wrong_scale_fails_its_certificate(tiny_model_dir, tmp_path, monkeypatch):
    # rsLoRA's scale not folded into alpha: llama.cpp then applies alpha / r, half of alpha / sqrt(r).
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", rslora=True)
    monkeypatch.setattr(adapter_module, "llama_cpp_alpha", lambda spec: spec.alpha)
    with pytest.raises(UserError, match="failed its certificate"):
        export_gguf(adapter, tmp_path / "a.gguf", adapter_only=True, **QUIET)
    assert not (tmp_path / "a.gguf").exists()


def test_dora_and_whole_modules_are_refused_as_adapter_gguf_pointing_to_fuse(tiny_model_dir, tmp_path):
    dora = random_adapter(tiny_model_dir, tmp_path / "dora", dora=True)
    with pytest.raises(UserError, match="is DoRA: .* fuse it"):
        export_gguf(dora, tmp_path / "a.gguf", adapter_only=True, **QUIET)
    head = random_adapter(tiny_model_dir, tmp_path / "head", modules_to_save=["score"])
    with pytest.raises(UserError, match="trains score in full, .* fuse it"):
        export_gguf(head, tmp_path / "a.gguf", adapter_only=True, **QUIET)
    assert not (tmp_path / "a.gguf").exists()


def test_a_modelfile_names_the_base_and_the_adapter(tiny_model_dir, tmp_path):
    export_gguf(tiny_model_dir, tmp_path / "base.gguf", "f16", **QUIET)
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    report = export_gguf(adapter, tmp_path / "a.gguf", adapter_only=True, base_gguf=tmp_path / "base.gguf",
                         ollama_name="tuned", force=True, **QUIET)
    assert report["certificate"]["passed"] and report["certificate"]["type"] == "f16"
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./base.gguf\nADAPTER ./a.gguf\nTEMPLATE")


@pytest.mark.slow
def test_k_quants_come_from_llama_cpps_quantizer(tiny_model_dir, tmp_path):
    import gguf

    report = export_gguf(tiny_model_dir, tmp_path / "q.gguf", "q4_k_m", **QUIET)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and report["certificate"]["tokenizer"]["mismatches"] == []
    assert len(set(types.values()) - {"F32"}) >= 1 and "F16" not in types.values(), types
