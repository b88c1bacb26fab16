"""`mlxft generate` and `mlxft chat`: prompts as the model was tuned on them, history, commands,
stop strings, and streaming through the CLI."""

import pytest
from click.testing import CliRunner

from mlxft.chat import run_chat
from mlxft.cli import cli
from mlxft.conversation import Conversation, render_messages, resolve_template
from mlxft.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from mlxft.errors import UserError
from mlxft.generation import Sampling, StopScanner


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_alpaca_plain_and_chat_prompts(char_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert render_messages(messages[1:], "alpaca", None) == ALPACA_NO_INPUT.format(instruction="Name a colour.")
    assert render_messages(messages, "alpaca", None, "warm ones") == \
        "Be brief.\n\n" + ALPACA_WITH_INPUT.format(instruction="Name a colour.", input="warm ones")
    assert render_messages(messages, "plain", None, "warm ones") == "Be brief.\n\nName a colour.\n\nwarm ones"
    assert render_messages(messages, "chat", char_tokenizer, "warm ones") == \
        "<|system|>\nBe brief.<|end|>\n<|user|>\nName a colour.\n\nwarm ones<|end|>\n<|assistant|>\n"
    assert resolve_template("auto", char_tokenizer) == "chat"
    char_tokenizer.chat_template = None
    assert resolve_template("auto", char_tokenizer) == "alpaca"
    with pytest.raises(UserError, match="no chat template"):
        resolve_template("chat", char_tokenizer)


def test_stop_strings_are_cut_across_pieces():
    scanner = StopScanner(["###", "END"])
    shown = [scanner.feed(piece) for piece in ["Hello #", "# wor", "ld ##", "# more"]]
    assert "".join(shown) == "Hello ## world " and scanner.stopped
    assert shown[0] == "Hello "  # "#" is held back: it could start "###"
    scanner = StopScanner(["###"])
    assert scanner.feed("ab#") == "ab" and scanner.finish() == "#" and not scanner.stopped


class Recording:
    """A generator stand-in that answers with a counter and remembers each prompt."""

    name, context_length = "fake", 10_000

    def __init__(self):
        self.prompts = []

    def encode(self, prompt):
        self.prompts.append(prompt)
        return [1] * len(prompt)

    def stream(self, ids, sampling):
        from mlxft.backends.mlx.stream import Piece

        n = len(self.prompts)
        yield Piece(f"answer {n}", None, len(ids), 1)
        yield Piece("!", "stop", len(ids), 2)


def test_chat_keeps_history_until_reset(char_tokenizer):
    generator, lines, shown = Recording(), iter(["hello", "/input a note", "again", "/reset", "fresh", "/bogus", "/quit", "never"]), []
    run_chat(generator, Conversation("chat", char_tokenizer, system="Be kind."), Sampling(), read=lambda _: next(lines), write=shown.append)
    first, second, third = generator.prompts
    assert first == "<|system|>\nBe kind.<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\n"
    assert second == ("<|system|>\nBe kind.<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\nanswer 1!<|end|>\n"
                      "<|user|>\nagain\n\na note<|end|>\n<|assistant|>\n")
    assert third == first.replace("hello", "fresh")  # /reset forgot both turns, and the input
    output = "".join(shown)
    assert "answer 1!" in output and "conversation cleared" in output and "/reset" in output


def test_generate_streams_the_greedy_answer(tiny_model_dir):
    from mlxft.backends.mlx.stream import load_generator

    generator = load_generator(str(tiny_model_dir))

    def greedy(prompt):
        return "".join(p.text for p in generator.stream(generator.encode(prompt), Sampling(max_tokens=12)))

    for template, expected in (("plain", greedy("Below is an instruction")),
                               ("alpaca", greedy(ALPACA_NO_INPUT.format(instruction="Below is an instruction")))):
        result = run("generate", "--model", tiny_model_dir, "--template", template, "--prompt", "Below is an instruction", "--max-tokens", 12)
        assert result.exit_code == 0, result.output
        assert result.output == expected + "\n"
    assert "instruction" in expected or "instruction" in greedy("Below is an instruction")  # a real answer, not blanks
    sampled = [run("generate", "--model", tiny_model_dir, "--prompt", "Hi", "--temperature", 1, "--top-k", 50,
                   "--top-p", 0.9, "--repetition-penalty", 1.3, "--seed", 5, "--max-tokens", 8).output for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].strip()


def test_chat_command_with_an_adapter(tiny_model_dir, tmp_path):
    import numpy as np

    from mlxft.adapters import AdapterSpec, save_adapter

    a = np.random.default_rng(0).normal(0, 0.2, (4, 32)).astype(np.float32)
    weights = {f"model.layers.{i}.self_attn.q_proj": (a, a.T.copy()) for i in range(2)}
    save_adapter(tmp_path / "run" / "best", AdapterSpec(4, 8, 0.0, ["q_proj"], str(tiny_model_dir)), weights)
    # No --model: the adapter names its base.
    result = run("chat", "--adapter", tmp_path / "run", "--max-tokens", 6, input="hello\n/reset\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "conversation cleared" in result.output and result.output.count(">>> ") == 3


def test_pytorch_backend_says_it_is_not_there_yet(tiny_model_dir, tmp_path):
    for args in (("generate", "--prompt", "hi"), ("chat",), ("serve",), ("fuse", "--adapter", tmp_path, "--out", tmp_path / "o")):
        result = run(*args, "--model", tiny_model_dir, "--backend", "torch")
        assert result.exit_code == 2 and "MLX backend only" in result.output, args


def test_a_whole_model_is_not_an_adapter(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "run" / "best")
    result = run("generate", "--adapter", tmp_path / "run", "--prompt", "hi")
    assert result.exit_code == 2 and "--model" in result.output and "whole model" in result.output
