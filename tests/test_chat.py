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
        from mlxft.generation import Piece

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

    from mlxft.models.adapters import AdapterSpec, save_adapter

    a = np.random.default_rng(0).normal(0, 0.2, (4, 32)).astype(np.float32)
    weights = {f"model.layers.{i}.self_attn.q_proj": (a, a.T.copy()) for i in range(2)}
    save_adapter(tmp_path / "run" / "best", AdapterSpec(4, 8, 0.0, ["q_proj"], str(tiny_model_dir)), weights)
    # No --model: the adapter names its base.
    result = run("chat", "--adapter", tmp_path / "run", "--max-tokens", 6, input="hello\n/reset\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "conversation cleared" in result.output and result.output.count(">>> ") == 3


def test_a_whole_model_is_not_an_adapter(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "run" / "best")
    result = run("generate", "--adapter", tmp_path / "run", "--prompt", "hi")
    assert result.exit_code == 2 and "--model" in result.output and "whole model" in result.output


# PyTorch behind generate and chat: the same answers as MLX from the same model and adapter.

PROMPTS = ["Below is an instruction", ALPACA_NO_INPUT.format(instruction="Name three colours."), "The news"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """An adapter on q_proj, v_proj and down_proj with non-zero B, so that it changes the answers."""
    import numpy as np

    from mlxft.models.adapters import AdapterSpec, save_adapter

    rng = np.random.default_rng(1)
    shapes = {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (32, 32), "mlp.down_proj": (32, 64)}
    weights = {f"model.layers.{i}.{name}": (rng.normal(0, 0.3, (4, n_in)).astype(np.float32), rng.normal(0, 0.3, (n_out, 4)).astype(np.float32))
               for i in range(2) for name, (n_out, n_in) in shapes.items()}
    folder = tmp_path_factory.mktemp("adapter") / "a"
    save_adapter(folder, AdapterSpec(4, 8, 0.0, ["q_proj", "v_proj", "down_proj"], str(tiny_model_dir)), weights)
    return folder


@pytest.fixture(scope="module")
def generators(adapter):
    from mlxft.backends.mlx.stream import load_generator as mlx_generator
    from mlxft.backends.torch.stream import load_generator as torch_generator

    return {"mlx": mlx_generator(None, adapter), "torch": torch_generator(None, adapter)}


def answer(generator, prompt, **settings):
    """(text, finish_reason, completion tokens, prompt tokens) of one streamed answer."""
    pieces = list(generator.stream(generator.encode(prompt), Sampling(**settings)))
    assert all(p.finish_reason is None for p in pieces[:-1])
    return "".join(p.text for p in pieces), pieces[-1].finish_reason, pieces[-1].completion_tokens, pieces[-1].prompt_tokens


def test_greedy_answers_are_the_same_token_for_token_on_both_backends(generators, tiny_model_dir):
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    from mlxft.backends.torch.stream import load_generator, sampled_tokens

    mlx, torch = generators["mlx"], generators["torch"]
    answers = []
    for prompt in PROMPTS:
        ids = mlx.encode(prompt)
        assert torch.encode(prompt) == ids
        mlx_tokens = [r.token for r in stream_generate(mlx.model, mlx.tokenizer, mx.array(ids), max_tokens=16)]
        answers.append(list(sampled_tokens(torch.model, ids, Sampling(max_tokens=16))))
        assert answers[-1] == mlx_tokens
    assert answer(torch, PROMPTS[1], max_tokens=16) == answer(mlx, PROMPTS[1], max_tokens=16)  # text, finish, counts
    # The adapter is applied on PyTorch: without it the answer is another.
    base = load_generator(str(tiny_model_dir))
    assert list(sampled_tokens(base.model, base.encode(PROMPTS[0]), Sampling(max_tokens=16))) != answers[0]


def test_generate_and_chat_run_on_pytorch(adapter):
    args = ("generate", "--adapter", adapter, "--template", "alpaca", "--prompt", "Name three colours.", "--max-tokens", 16)
    on_mlx, on_torch = run(*args, "--backend", "mlx"), run(*args, "--backend", "torch")
    assert on_torch.exit_code == 0, on_torch.output
    assert on_torch.output == on_mlx.output and len(on_torch.output.strip()) > 5
    result = run("chat", "--adapter", adapter, "--backend", "torch", "--max-tokens", 6, input="hello\n/reset\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "conversation cleared" in result.output and result.output.count(">>> ") == 3


def test_stop_strings_and_max_tokens_on_pytorch_as_on_mlx(generators):
    mlx, torch = generators["mlx"], generators["torch"]
    text, finish, used, _ = answer(torch, PROMPTS[0], max_tokens=24)
    assert finish == "length" and used == 24
    stop = text[8:11]
    cut = answer(torch, PROMPTS[0], max_tokens=24, stop=[stop, "never appears"])
    assert cut[:2] == (text[:text.index(stop)], "stop") and cut[2] < 24
    assert cut == answer(mlx, PROMPTS[0], max_tokens=24, stop=[stop, "never appears"])
    assert answer(torch, PROMPTS[0], max_tokens=3)[1:3] == ("length", 3)


def test_sampling_on_pytorch_follows_the_seed(generators):
    torch = generators["torch"]
    settings = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.3, "max_tokens": 12}
    first = answer(torch, PROMPTS[0], seed=7, **settings)
    assert answer(torch, PROMPTS[0], seed=7, **settings) == first
    assert {answer(torch, PROMPTS[0], seed=s, **settings)[0] for s in (8, 9, 10)} != {first[0]}


def test_pytorch_sampling_filters_are_mlx_lms():
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm.sample_utils import apply_top_k, apply_top_p, make_repetition_penalty

    from mlxft.backends.torch.sampling import keep_top_k, keep_top_p, next_token, penalize_repetition

    logits = np.random.default_rng(0).normal(0, 1, 500).astype(np.float32)
    logprobs = torch.log_softmax(torch.from_numpy(logits), -1)
    mx_logprobs = mx.array(logprobs.numpy())[None]
    for top_p in (0.3, 0.9):
        kept = torch.isfinite(keep_top_p(logprobs, top_p)).numpy()
        assert 1 < kept.sum() < 500
        assert (kept == np.isfinite(np.array(apply_top_p(mx_logprobs, top_p))[0])).all()
    kept = torch.isfinite(keep_top_k(logprobs, 7)).numpy()
    assert kept.sum() == 7 and (kept == np.isfinite(np.array(apply_top_k(mx_logprobs, 7))[0])).all()
    recent = [3, 3, 40, 499, int(logits.argmax())]
    penalized = penalize_repetition(torch.from_numpy(logits), recent, 1.5).numpy()
    expected = np.array(make_repetition_penalty(1.5)(mx.array(recent), mx.array(logits)[None]))[0]
    np.testing.assert_allclose(penalized, expected, rtol=1e-6)
    assert not np.allclose(penalized, logits)
    # Greedy takes the argmax after the penalty: a strong enough penalty moves it off the top token.
    top = int(logits.argmax())
    assert next_token(torch.from_numpy(logits), [], Sampling()) == top
    assert next_token(torch.from_numpy(logits), [top], Sampling(repetition_penalty=50.0)) != top


def test_answer_pieces_end_at_eos_max_tokens_or_a_stop_string(builtin_tokenizer):
    from mlxft.generation import answer_pieces

    tokenizer, eos = builtin_tokenizer, builtin_tokenizer.eos_token_id
    words = tokenizer.encode("Three colours: red, green and blue.", add_special_tokens=False)
    pulled = []

    def source(ids):
        for token in ids:
            pulled.append(token)
            yield token

    def pieces(ids, **settings):
        pulled.clear()
        out = list(answer_pieces(source(ids), tokenizer, {eos}, Sampling(**settings), 5))
        return "".join(p.text for p in out), out[-1].finish_reason, out[-1].completion_tokens, len(pulled)

    whole = tokenizer.decode(words)
    assert pieces([*words, eos, *words]) == (whole, "stop", len(words), len(words) + 1)  # EOS ends it, not counted
    assert pieces(words, max_tokens=4) == (tokenizer.decode(words[:4]), "length", 4, 4)  # nothing pulled past the end
    text, finish, used, n = pieces([*words, eos], stop=["green"])
    assert (text, finish) == (whole[:whole.index("green")], "stop") and used == n < len(words)
    assert pieces(words, max_tokens=100) == (whole, "length", len(words), len(words))  # the source ran out
