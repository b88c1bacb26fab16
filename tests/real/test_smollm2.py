"""SmolLM2-135M-Instruct through mlxft: what the built-in model cannot show (a real tokenizer and
chat template, RoPE theta 100000, tied embeddings, a quantized GGUF source)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from marks import extended

from mlxft.resources import bundled

QUESTION = "What is the capital of France?"
PROBE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital"


def test_greedy_answer_on_mlx(real_model):
    from mlxft.backends.mlx.stream import load_generator
    from mlxft.chat import stream_answer
    from mlxft.conversation import Conversation, resolve_template
    from mlxft.generation import Sampling

    generator = load_generator(str(real_model))
    conversation = Conversation(resolve_template("auto", generator.tokenizer), generator.tokenizer, None)
    answer = stream_answer(generator, conversation.prompt(QUESTION, ""), Sampling(max_tokens=24), lambda text: None)
    # Exactly: the folder loaded with the wrong RoPE theta also said "Paris", in French nonsense.
    assert answer.strip() == "The capital of France is Paris."


def test_mlx_and_pytorch_give_the_same_logits_from_the_folder_and_the_gguf(real_model, real_gguf, tmp_path, monkeypatch):
    import mlx.core as mx
    import torch

    from mlxft.backends.mlx.model import load as load_mlx
    from mlxft.backends.torch.model import load as load_torch

    monkeypatch.setenv("MLXFT_HOME", str(tmp_path))
    mlx_model, tokenizer, _ = load_mlx(str(real_model))
    ids = [tokenizer.encode(PROBE)]
    on_mlx = np.array(mlx_model(mx.array(ids)))
    torch_model, _, _ = load_torch(str(real_gguf), device=torch.device("cpu"))  # the GGUF, converted here again
    with torch.no_grad():
        on_torch = torch_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(on_mlx - on_torch).max() < 1e-3  # measured 1.1e-4, logits up to ~38
    assert tokenizer.decode([int(on_torch[0, -1].argmax())]).strip() == "of"


def mlxft(*args):
    """The command as a user runs it: in a process of its own, so that on Linux MLX gets the
    OpenBLAS shim the `mlxft` entry point preloads (in-process MLX training is ~40x slower)."""
    return subprocess.run([sys.executable, "-m", "mlxft.cli", *map(str, args)], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_tallrec_lora_learns_on_both_backends(real_model, tmp_path, backend):
    out = tmp_path / "run"
    result = mlxft(
        "lora", "--recipe", "tallrec", "--model", real_model, "--backend", backend, "--out", out,
        "--set", "data.max_history=2", "--set", "data.k_shot=24", "--set", "data.max_valid_rows=8",
        "--set", "train.batch_size=4", "--set", "train.steps=6", "--set", "train.warmup_steps=1",
        "--set", "train.learning_rate=1e-3", "--set", "train.report_every=1", "--set", "eval.every=0",
        "--set", "train.checkpoint_every=3")
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_parameters"] == 30 * 8 * (576 + 576) + 30 * 8 * (576 + 192)  # q_proj and v_proj, r 8
    for name in ("config.yaml", "best/adapter_model.safetensors", "last/adapter_config.json", "checkpoint/state.json"):
        assert (out / name).exists(), name


# Measured agreement of llama.cpp's greedy tokens with mlxft's before the first divergence, over the
# certificate's 4 prompts (benchmarks/RESULTS.md): f16 1.00, q8_0 0.90, q4_k_m 0.61; on another
# machine q8_0 0.775, its two divergences both near ties (gaps 0.3% of the largest logit; 1.00 beyond ties).
AGREEMENT = {"f16": 1.0, "q8_0": 0.8, "q4_k_m": 0.45}


@pytest.mark.parametrize("kind", list(AGREEMENT))
def test_export_gguf_is_certified_in_llama_cpp(real_model, tmp_path, kind):
    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install 'mlxft[llama-cpp]'")
    out = tmp_path / "smollm2.gguf"
    result = mlxft("export", "gguf", real_model, "--out", out, "--type", kind, "--ollama", "smollm2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llama.cpp pre-tokenizer 'smollm'" in result.stdout and "certified in llama.cpp via" in result.stdout
    certificate = json.loads((tmp_path / "smollm2.certificate.json").read_text())
    assert certificate["passed"] and certificate["tokenizer"]["mismatches"] == []
    assert certificate["tokenizer"]["leading_space_differences"] == []  # byte-level BPE has none
    # Beyond near ties: mlxft's own pick at a near tie depends on the BLAS it runs on (the France
    # prompt's first token on one machine's OpenBLAS, at a gap of 0.3% of the largest logit).
    assert certificate["greedy"]["token_agreement_beyond_ties"] >= AGREEMENT[kind], certificate["greedy"]
    assert "named SmolLM" in (tmp_path / "Modelfile").read_text()  # the template's default system prompt
    if kind != "f16":
        return
    # The numbers and contractions prompt, which the `default` pre-tokenizer answered otherwise.
    arithmetic = next(a for a in certificate["greedy"]["answers"] if "1234" in a["prompt"])
    assert arithmetic["equal"] and arithmetic["llama_cpp"].startswith("1234 + 5678 is a classic math problem")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_model))
    ids = torch.tensor([tokenizer.encode(PROBE)])
    with torch.no_grad():
        source = AutoModelForCausalLM.from_pretrained(str(real_model), dtype=torch.float32)(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smollm2.gguf", dtype=torch.float32)(ids).logits
    assert float((exported - source).abs().max() / source.abs().max()) < 5e-3


def test_an_adapter_gguf_answers_under_lora_as_mlxft_generate_does(real_model, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install 'mlxft[llama-cpp]'")
    from mlxft.models.adapters import AdapterSpec, save_adapter

    rng = np.random.default_rng(0)
    weights = {f"model.layers.{i}.self_attn.{name}": (rng.normal(0, 0.02, (8, 576)), rng.normal(0, 0.02, (out, 8)))
               for i in range(30) for name, out in (("q_proj", 576), ("v_proj", 192))}
    adapter = save_adapter(tmp_path / "adapter", AdapterSpec(r=8, alpha=16.0, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                             base_model=str(real_model)), weights)
    result = mlxft("export", "gguf", adapter, "--adapter-only", "--out", tmp_path / "lora.gguf")
    assert result.returncode == 0, result.stdout + result.stderr
    certificate = json.loads((tmp_path / "lora.certificate.json").read_text())
    assert certificate["passed"] and certificate["greedy"]["equal"] == 4, certificate["greedy"]
    generated = mlxft("generate", "--model", real_model, "--adapter", adapter, "--prompt", QUESTION, "--max-tokens", "24")
    assert generated.returncode == 0, generated.stderr
    answer = next(a for a in certificate["greedy"]["answers"] if a["prompt"] == QUESTION)
    assert generated.stdout.strip() == answer["llama_cpp"].strip()


@pytest.mark.parametrize("backend", ["mlx", pytest.param("torch", marks=extended)])
def test_dpo_on_the_bundled_pairs_moves_an_instruct_model(real_model, tmp_path, backend):
    # 12 steps of 8 pairs, ~60 s a backend.
    out = tmp_path / "dpo"
    result = mlxft("dpo", "--recipe", "dpo", "--model", real_model, "--backend", backend, "--out", out,
                   "--set", "data.k_shot=48", "--set", "data.max_valid_rows=16", "--set", "train.epochs=2",
                   "--set", "train.learning_rate=1e-3", "--set", "train.warmup_steps=1", "--set", "eval.every=0",
                   "--set", "eval.generate_examples=2", "--set", "eval.max_new_tokens=12")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["eval_loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference
    assert summary["after"]["eval_rewards/accuracies"] >= summary["before"]["eval_rewards/accuracies"] + 0.2
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["empty_answers"] == {"before": 0, "after": 0}  # through the chat template, not bare
    answers = [(item["before"], item["after"]) for item in comparison["items"]]
    assert all(sum(c.isalpha() for c in text) > 10 for pair in answers for text in pair), answers
    assert any(before != after for before, after in answers), answers


def test_a_reward_model_learns_the_bundled_pairs_and_scores_the_same_on_both_backends(real_model, tmp_path):
    # Trained on PyTorch (8 steps of 8 pairs, ~75 s), scored by `mlxft eval reward` on both backends.
    out = tmp_path / "reward"
    result = mlxft("reward", "--recipe", "reward", "--model", real_model, "--backend", "torch", "--out", out,
                   "--set", "data.k_shot=32", "--set", "data.max_valid_rows=32", "--set", "train.epochs=2",
                   "--set", "train.learning_rate=1e-3", "--set", "train.warmup_steps=1", "--set", "eval.every=0")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    # measured: 0.28 -> 0.72 (a new head starts below chance on these pairs)
    assert summary["after"]["eval_accuracy"] >= summary["before"]["eval_accuracy"] + 0.3, summary
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(line + "\n" for line in bundled("data/preference-sample.jsonl").read_text().splitlines()[-12:]))
    scores = {}
    for backend in ("mlx", "torch"):
        result = mlxft("eval", "reward", "--model", real_model, "--adapter", out / "last", "--data", pairs,
                       "--backend", backend, "--out", tmp_path / f"{backend}.jsonl")
        assert result.returncode == 0, result.stdout + result.stderr
        scores[backend] = [list(json.loads(line).values()) for line in (tmp_path / f"{backend}.jsonl").read_text().splitlines()]
    assert np.abs(np.array(scores["mlx"]) - np.array(scores["torch"])).max() < 2e-3, scores  # scores ~1-5


def test_qlora_on_mlx_trains_and_starts_where_the_float_model_does(real_model, tmp_path):
    # The CPU's 4-bit kernel runs at ~2 GFLOP/s: a few short rows only (QLoRA is for Metal and CUDA).
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in [
        ("What is the capital of France?", "Paris."), ("What is 2 plus 2?", "4."),
        ("Name a primary colour.", "Red."), ("What is the opposite of hot?", "Cold.")]))
    first = {}
    for name, extra in (("float", []), ("4bit", ["--quantize", "4"])):
        out = tmp_path / name
        result = mlxft("lora", "--recipe", "alpaca-sft", "--model", real_model, "--data", rows, "--backend", "mlx",
                       "--out", out, *extra, "--set", "data.split=[1,0,0]", "--set", "data.template=auto",
                       "--set", "train.batch_size=4",
                       "--set", "train.steps=2", "--set", "train.report_every=1", "--set", "eval.every=0",
                       "--set", "eval.generate_examples=0", "--set", "train.learning_rate=1e-3")
        assert result.returncode == 0, result.stdout + result.stderr
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        first[name] = losses[0]
        counted = float(re.search(r"\(([\d.]+)M parameters\)", result.stdout).group(1))
        assert 134.5 <= counted < 136, result.stdout  # the unquantized count (with the adapter), not 21.5M
    # 4-bit weights (embeddings and the tied head too, as mlx-lm quantizes them) cost a model this
    # small dearly: measured 2.27 (float) against 3.00 (4-bit, group 64) on these rows.
    assert first["float"] < first["4bit"] < 1.45 * first["float"], first
