"""Shared test fixtures. Everything here is offline and small."""

from __future__ import annotations

import os
import threading
from http.server import ThreadingHTTPServer

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tests/test_hub.py reads only folders it makes
# Runs compared number for number (resume, parity, ranks) keep their thread counts: a count changed
# mid-run by mlxft.cpu_share adds products in another order. tests/test_cpu_share.py tests it.
os.environ.setdefault("MLXFT_CPU_THREADS", "off")


class CharTokenizer:
    """A character-level tokenizer with the Hugging Face methods the data layer uses.

    One character is one token (id = code point + 3), so a prompt of n characters is exactly
    n tokens after BOS and masks can be written out literally in tests.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    bos_token = "<s>"
    eos_token = "</s>"
    chat_template = "<|role|>\\ncontent<|end|>\\n"  # marker only; rendering below

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) + 3 for c in text]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids):
        specials = {0: "<pad>", 1: "<s>", 2: "</s>"}
        return "".join(specials.get(i, chr(i - 3) if i > 2 else "") for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [self.decode([i]) for i in ids]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def builtin_tokenizer(tmp_path_factory):
    """The real built-in tokenizer, built once per test session into a temporary cache."""
    os.environ["MLXFT_HOME"] = str(tmp_path_factory.mktemp("mlxft-home"))
    from mlxft.models.files import load_tokenizer

    return load_tokenizer("builtin")


TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture(scope="session")
def tiny_model_dir(builtin_tokenizer, tmp_path_factory):
    """A 2-layer, 32-wide Llama with the built-in tokenizer: trains a step in milliseconds."""
    import shutil

    from mlxft.models.builtin import tokenizer_dir, write_model

    folder = tmp_path_factory.mktemp("tiny-model")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir() / name).exists():
            shutil.copy(tokenizer_dir() / name, folder / name)
    write_model(folder, TINY, seed=1)
    return folder


@pytest.fixture(autouse=True)
def unpatched_llama_blocks():
    """mlx-lm's gradient checkpointing patches the Llama block class itself, for every later model
    of the process; a test that turns it on must not change the tests after it."""
    try:
        from mlx_lm.models.llama import TransformerBlock
    except ImportError:
        yield
        return
    call = TransformerBlock.__call__
    yield
    TransformerBlock.__call__ = call


@pytest.fixture
def stop_after_step(monkeypatch):
    """stop_after_step(n): the next training run in this process is killed (KeyboardInterrupt, as
    Ctrl-C or a kill stops it) right after its n-th optimizer step. The returned counter then
    counts the optimizer steps taken after the kill, so a resume test can assert that only the
    remaining steps ran."""
    from mlxft.train.progress import Progress

    original = Progress.update

    def arm(n: int) -> dict:
        counter = {"before_stop": 0, "after_stop": 0}

        def update(self, *args, **kwargs):
            if counter["before_stop"] < n:
                counter["before_stop"] += 1
                if counter["before_stop"] == n:
                    raise KeyboardInterrupt
            else:
                counter["after_stop"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Progress, "update", update)
        return counter

    return arm


@pytest.fixture
def tiny_as_builtin(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model in the place of the built-in one (a fresh MLXFT_HOME), so that recipes'
    builtin_model sections apply to it, without minutes of building the real one."""
    import shutil

    from mlxft.models.builtin import builtin_dir

    monkeypatch.setenv("MLXFT_HOME", str(tmp_path / "mlxft-home"))
    shutil.copytree(tiny_model_dir, builtin_dir())
    return builtin_dir()


@pytest.fixture
def fake_judge():
    from judge_server import FakeJudge

    FakeJudge.replies, FakeJudge.requests = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
