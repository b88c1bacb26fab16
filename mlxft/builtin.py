"""The built-in model: what every command uses when no --model is named, so mlxft runs offline.

It is a tiny Llama (config.json + model.safetensors, Hugging Face names) whose weights are drawn
from a fixed seed with numpy, so both backends load the same folder through their usual loaders.

Its tokenizer is a sentencepiece BPE model trained on the bundled samples and the prompt
templates, saved as a Hugging Face `LlamaTokenizer` folder (tokenizer.model +
tokenizer_config.json + tokenizer.json), so transformers and mlx-lm load it like any model's.
It is built on first use into the cache folder (MLXFT_HOME, default ~/.cache/mlxft), from a
fixed seed and single-threaded training, so every machine builds the same files. The folder
name carries a hash of everything it is built from: editing a sample builds a new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from mlxft.model_files import TOKENIZER_OUTPUTS
from mlxft.resources import bundled

BUILTIN_VERSION = "2"  # 2: pre-trained with bias-corrected AdamW, 24 rows a step
VOCAB_SIZE = 2048
# Plain text files under data/ whose every line feeds the tokenizer (and, later, pre-training).
MIND_SAMPLE = "data/mind-sample"
CORPUS_FILES = ("data/mind-sample/news.tsv", "data/alpaca-sample.json", "data/products.csv",
                "data/preference-sample.jsonl", "data/opposing-sample.json")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("MLXFT_HOME", Path.home() / ".cache" / "mlxft")).expanduser()


def corpus_lines() -> list[str]:
    """Every text the built-in tokenizer should cover: the templates, the bundled samples, and
    the bundled MIND sample rendered as TALLRec prompts (so "Yes" and "No" are whole pieces)."""
    from mlxft.data.sources.mind import iter_tallrec_rows
    from mlxft.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, PHI3_WITH_INPUT, alpaca_prompt

    lines = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT, PHI3_WITH_INPUT]
    for name in CORPUS_FILES:
        lines += bundled(name).read_text(encoding="utf-8").splitlines()
    for row in iter_tallrec_rows(bundled(MIND_SAMPLE)):
        lines.append(alpaca_prompt(row["instruction"], row["input"]) + row["output"])
    return [line for line in lines if line.strip()]


def _digest(extra: str) -> str:
    digest = hashlib.sha256((BUILTIN_VERSION + extra).encode())
    for name in CORPUS_FILES + (f"{MIND_SAMPLE}/behaviors.tsv",):
        digest.update(bundled(name).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:12]


def builtin_dir() -> Path:
    """The cache folder of the model, named by a hash of the files it is built from."""
    return cache_root() / f"builtin-{_digest('model')}"


def tokenizer_dir() -> Path:
    return cache_root() / f"builtin-tokenizer-{_digest('tokenizer')}"


def ensure_builtin_tokenizer() -> Path:
    """The tokenizer alone (seconds to build): enough for `data inspect` and the data tests."""
    return _build_once(tokenizer_dir(), "tokenizer_config.json", lambda staging: write_tokenizer(staging, corpus_lines()))


def ensure_builtin(echo=None) -> Path:
    """The built-in model folder, built (and briefly pre-trained) first if not in the cache."""

    def build(staging: Path) -> None:
        for name in TOKENIZER_OUTPUTS:
            source = ensure_builtin_tokenizer() / name
            if source.exists():
                shutil.copy(source, staging / name)
        write_model(staging)
        pretrain(staging, echo or (lambda text: print(text, file=sys.stderr, flush=True)))

    return _build_once(builtin_dir(), "model.safetensors", build)


def _build_once(target: Path, marker: str, build) -> Path:
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename: a killed build never leaves half a model,
    # and two processes building at once both end with a complete folder.
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# Pre-training: a random model has to discover, from one Yes/No bit per row, how to carry the
# target title to the answer position and compare it with the liked and disliked titles; on two
# CPU cores that takes far longer than the run's budget (measured: no AUC gain after 500 steps).
# A short language-model pass over news-recommendation prompts teaches it to read them first.
# The prompts come from a synthetic MIND log with another seed than the bundled sample (other
# users, impressions and titles), and carry no answers, so nothing about the evaluation leaks.
# Sized for the budget of a first `mlxft lora --recipe tallrec` (10 minutes on 2 CPU cores):
# measured on MLX's CPU backend, 300 steps of 24 rows take ~5 minutes; fine-tuned with the
# recipe, 4 of 4 seeds then went from 0.52 to 0.62-0.65 validation AUC (200 steps of 32 rows:
# 0.50 -> 0.61-0.63; 300 of 32, a minute longer: 0.48 -> 0.61-0.68).
PRETRAIN = {"steps": 300, "batch_size": 24, "learning_rate": 3e-3, "seed_offset": 1, "max_history": 10}


def pretraining_rows() -> list[dict]:
    """Text rows: whole TALLRec prompts (header, the user's titles, the target question), no answer.

    Measured: scoring the header too trains better than scoring the titles alone (AUC after the
    same fine-tuning 0.60 against 0.53), though each step costs more."""
    from mlxft.data.sources.mind import iter_tallrec_rows
    from mlxft.data.sources.synthetic import _tsv
    from mlxft.data.sources.synthetic_mind import DEFAULT_SEED, make_mind
    from mlxft.data.templates import alpaca_prompt

    behaviors, news = make_mind(DEFAULT_SEED + PRETRAIN["seed_offset"])
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "behaviors.tsv").write_text(_tsv(behaviors))
        (Path(folder) / "news.tsv").write_text(_tsv(news))
        rows = list(iter_tallrec_rows(folder, max_history=PRETRAIN["max_history"]))
    return [{"text": alpaca_prompt(row["instruction"], row["input"])} for row in rows]


def pretrain(folder: Path, echo) -> None:
    """Full fine-tuning of the fresh weights in `folder` on pretraining_texts(), in place."""
    from mlxft.backends.mlx.sft import train
    from mlxft.config import load_config
    from mlxft.data.records import write_jsonl
    from mlxft.runs import Run

    work = folder / ".pretrain"
    write_jsonl(pretraining_rows(), work / "text.jsonl")
    config = load_config(None, [
        f"model.name={folder}", f"data.source={work / 'text.jsonl'}", "data.template=plain", "data.split=[1,0,0]",
        "lora.full_finetune=true", f"train.steps={PRETRAIN['steps']}", f"train.batch_size={PRETRAIN['batch_size']}",
        f"train.learning_rate={PRETRAIN['learning_rate']}", "train.warmup_steps=20", "train.report_every=50",
        f"train.checkpoint_every={PRETRAIN['steps'] + 1}", "eval.every=0", f"out={work / 'run'}",
    ])
    echo(f"building the built-in model once: {PRETRAIN['steps']} steps of pre-training on news prompts")
    train(config, Run.create(work / "run", config), echo=lambda *a: None)
    os.replace(work / "run" / "last" / "model.safetensors", folder / "model.safetensors")
    shutil.rmtree(work)


# Small enough to train in minutes on two CPU cores, large enough to learn the bundled tasks.
ARCHITECTURE = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
WEIGHTS_SEED = 0


def model_config(vocab_size: int, architecture: dict | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **(architecture or ARCHITECTURE),
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def initial_weights(config: dict, seed: int = WEIGHTS_SEED) -> dict:
    """GPT-2-style initialisation: normal(0, 0.02), residual outputs scaled by 1/sqrt(2 * layers)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d, f, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    kv_dim = d // heads * kv
    std, out_std = 0.02, 0.02 / (2 * n) ** 0.5

    def normal(shape, scale=std):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal((config["vocab_size"], d)),
               "model.norm.weight": np.ones(d, np.float32)}
    for i in range(n):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal((d, d)),
            p + "self_attn.k_proj.weight": normal((kv_dim, d)),
            p + "self_attn.v_proj.weight": normal((kv_dim, d)),
            p + "self_attn.o_proj.weight": normal((d, d), out_std),
            p + "mlp.gate_proj.weight": normal((f, d)),
            p + "mlp.up_proj.weight": normal((f, d)),
            p + "mlp.down_proj.weight": normal((d, f), out_std),
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
        })
    return weights


def write_model(folder: Path, architecture: dict | None = None, seed: int = WEIGHTS_SEED) -> None:
    """config.json, model.safetensors and generation_config.json next to the tokenizer.
    Tests pass a smaller `architecture` to get a model that trains in a blink."""
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(folder)))
    config = model_config(vocab_size, architecture)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    save_file(initial_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_tokenizer(folder: Path, lines: list[str]) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,  # any text encodes; nothing becomes <unk>
        split_digits=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,  # deterministic
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # Round-trip through transformers so tokenizer.json exists too: mlx-lm and the Rust
    # tokenizers library read that file, and it makes loading fast.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "tokenizer.model").write_bytes(model.getvalue())
