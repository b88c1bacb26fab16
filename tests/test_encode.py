"""Masks written out literally: a shifted prompt/answer boundary or a scored pad fails here."""

import pytest

from mlxft.data.batching import collate
from mlxft.data.encode import answer_token_ids, encode_preference, encode_prompted, encode_records
from mlxft.data.records import Record
from mlxft.data.templates import ALPACA_NO_INPUT, PreferencePrompted, Prompted, render, resolve_template
from mlxft.errors import UserError

BOS, EOS = 1, 2


def chars(text):
    return [ord(c) + 3 for c in text]


def test_format_string_example_literal(char_tokenizer):
    record = Record({"q": "hi", "a": "ok"}, "t.csv:2")
    prompted = render(record, None, "Q:{q}\nA:", completion_field="a")
    assert prompted == Prompted("Q:hi\nA:", "ok")
    example, truncated = encode_prompted(prompted, char_tokenizer)
    assert example.input_ids == [BOS] + chars("Q:hi\nA:") + chars("ok") + [EOS]
    assert example.loss_mask == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert not truncated


def test_train_on_inputs_scores_everything_but_the_first_token(char_tokenizer):
    example, _ = encode_prompted(Prompted("ab", "c"), char_tokenizer, train_on_inputs=True)
    assert example.input_ids == [BOS] + chars("abc") + [EOS]
    assert example.loss_mask == [0, 1, 1, 1, 1]


def test_alpaca_texts_are_the_alpaca_lora_ones():
    with_input = render(Record({"instruction": "Add.", "input": "2 3", "output": "5"}, "x"), "alpaca", "alpaca")
    assert with_input.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 3"
        "\n\n### Response:\n"
    )
    no_input = render(Record({"instruction": "Greet.", "input": "", "output": "Hi"}, "x"), "alpaca", "alpaca")
    assert no_input.prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nGreet.\n\n### Response:\n"
    )
    assert no_input.completion == "Hi"


def test_alpaca_mask_literal(char_tokenizer):
    record = Record({"instruction": "Is it?", "input": "", "output": "Yes."}, "x")
    example, _ = encode_prompted(render(record, "alpaca", "alpaca"), char_tokenizer)
    n_prompt = 1 + len(ALPACA_NO_INPUT.format(instruction="Is it?"))
    assert n_prompt == 147
    assert example.loss_mask == [0] * 147 + [1, 1, 1, 1, 1]
    assert example.input_ids[147:] == chars("Yes.") + [EOS]


def test_phi3_mask_literal(char_tokenizer):
    record = Record({"instruction": "Hi", "input": "x", "output": "Yo"}, "x")
    prompted = render(record, "alpaca", "phi3")
    assert prompted.prompt == "<|user|>\nHi\nx\n<|assistant|>\n"
    example, _ = encode_prompted(prompted, char_tokenizer)
    assert example.loss_mask == [0] * 29 + [1, 1, 1]


TWO_TURNS = [
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"},
    {"role": "assistant", "content": "d"},
]


def test_chat_template_scores_every_assistant_turn(char_tokenizer):
    prompted = render(Record({"messages": TWO_TURNS}, "x"), "chat", "chat", char_tokenizer)
    assert prompted.completion == "d<|end|>\n"
    example, _ = encode_prompted(prompted, char_tokenizer)
    # BOS, then the history up to each answer read, each answer (with its end marker) scored, EOS.
    first, between = "<|user|>\na<|end|>\n<|assistant|>\n", "<|user|>\nc<|end|>\n<|assistant|>\n"
    assert example.input_ids == [BOS] + chars(first + "b<|end|>\n" + between + "d<|end|>\n") + [EOS]
    assert example.loss_mask == ([0] + [0] * 32 + [1] * 9 + [0] * 32 + [1] * 9 + [1])
    assert len(first) == len(between) == 32 and len("b<|end|>\n") == 9


def test_chat_template_scores_only_the_last_answer_when_asked(char_tokenizer):
    prompted = render(Record({"messages": TWO_TURNS}, "x"), "chat", "chat", char_tokenizer, assistant_turns="last")
    example, _ = encode_prompted(prompted, char_tokenizer)
    assert example.loss_mask == [0] * (1 + 32 + 9 + 32) + [1] * 10  # as mlx-lm scores a chat row


def test_a_template_that_rewrites_earlier_turns_cannot_score_them(char_tokenizer):
    class Forgetful(type(char_tokenizer)):  # drops earlier answers, as reasoning templates drop their thinking
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            kept = [m for i, m in enumerate(messages) if m["role"] != "assistant" or i > last]
            return super().apply_chat_template(kept, tokenize, add_generation_prompt)

    with pytest.raises(UserError, match="renders earlier turns differently.*set data.assistant_turns=last"):
        render(Record({"messages": TWO_TURNS}, "x"), "chat", "chat", Forgetful())
    assert render(Record({"messages": TWO_TURNS}, "x"), "chat", "chat", Forgetful(), assistant_turns="last").completion == "d<|end|>\n"


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["builtin", "chatml"])
def test_every_turn_is_scored_with_a_real_tokenizer(builtin_tokenizer, template):
    # The built-in tokenizer merges characters into tokens: each scored stretch must still decode to
    # exactly one answer with its end marker, and nothing else.
    import copy

    tokenizer = copy.copy(builtin_tokenizer)
    if template == "chatml":
        tokenizer.chat_template, end = CHATML, "<|im_end|>\n"
    else:
        end = "<|end|>\n"
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Germany?"}, {"role": "assistant", "content": "Berlin."}]
    example, _ = encode_prompted(render(Record({"messages": messages}, "x"), "chat", "chat", tokenizer), tokenizer)
    runs, start = [], None
    for i, m in enumerate(example.loss_mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer.decode(example.input_ids[start:i]))
            start = None
    assert runs == ["Paris." + end, "Berlin." + end + tokenizer.eos_token]


def test_chat_template_with_system_prompt(char_tokenizer):
    record = Record({"prompt": "q", "completion": "a"}, "x")
    prompted = render(record, "completion", "chat", char_tokenizer, system_prompt="Be brief.")
    assert prompted.prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nq<|end|>\n<|assistant|>\n"


def test_chat_needs_a_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(UserError, match="no chat template"):
        render(Record({"prompt": "q", "completion": "a"}, "x"), "completion", "chat", NoTemplate())


def test_truncation_keeps_the_start_and_is_reported(char_tokenizer):
    rows = [
        Record({"prompt": "abcdef", "completion": "gh"}, "f:1"),  # 1 + 6 + 2 + 1 = 10 tokens
        Record({"prompt": "abcdefghijkl", "completion": "m"}, "f:2"),  # answer entirely cut away
        Record({"prompt": "a", "completion": "b"}, "f:3"),
    ]
    examples, report = encode_records(rows, "completion", "plain", char_tokenizer, cutoff=8)
    assert report.truncated == 2 and report.dropped == 1 and report.kept == 2
    assert examples[0].input_ids == [BOS] + chars("abcdefg")
    assert examples[0].loss_mask == [0, 0, 0, 0, 0, 0, 0, 1]
    assert "1 dropped" in report.summary()


def test_no_usable_rows_is_an_error(char_tokenizer):
    rows = [Record({"prompt": "abcdefgh", "completion": "x"}, "f:1")]
    with pytest.raises(UserError, match="no usable rows"):
        encode_records(rows, "completion", "plain", char_tokenizer, cutoff=4)


def test_padding_never_carries_loss(char_tokenizer):
    a, _ = encode_prompted(Prompted("ab", "c"), char_tokenizer)
    b, _ = encode_prompted(Prompted("abcdef", "gh"), char_tokenizer)
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist()[0] == [BOS] + chars("abc") + [EOS, 0, 0, 0, 0, 0]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]]
    assert batch.lengths.tolist() == [5, 10]
    assert batch.tokens == 15 and batch.supervised_tokens == 5
    assert batch.padding_fraction == pytest.approx(0.25)


def test_format_string_resolution_errors():
    with pytest.raises(UserError, match="unknown template 'alpacca'"):
        resolve_template("alpacca", "alpaca")
    with pytest.raises(UserError, match="placeholders must be named"):
        resolve_template("Q: {}", None)
    with pytest.raises(UserError, match="need the chat template"):
        resolve_template("alpaca", "chat")


def test_answer_token_ids_come_from_the_tokenizer(char_tokenizer):
    assert answer_token_ids(char_tokenizer, ["Yes.", "No."]) == [ord("Y") + 3, ord("N") + 3]
    with pytest.raises(UserError, match="start with the same token"):
        answer_token_ids(char_tokenizer, ["Yes", "Yeah"])


def test_preference_truncation(char_tokenizer):
    prompted = PreferencePrompted("abcdef", "xyz", "uv")
    example, truncated = encode_preference(prompted, char_tokenizer, max_prompt_length=4, max_length=6)
    assert example.prompt_ids == chars("cdef")  # keep_end drops BOS and the start
    assert example.chosen_ids == chars("xy") and example.rejected_ids == chars("uv")
    assert truncated
    example, truncated = encode_preference(PreferencePrompted("ab", "x", "y"), char_tokenizer)
    assert example.prompt_ids == [BOS] + chars("ab") and example.chosen_ids == chars("x") + [EOS]
    assert not truncated


class Counting:
    """A tokenizer that remembers the longest text it was asked to encode."""

    def __init__(self, tokenizer):
        self.inner, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, add_special_tokens=True):
        self.longest = max(self.longest, len(text))
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def long_text(words: int) -> str:
    import numpy as np

    vocabulary = ["news", "user", "liked", "the", "election", "  ", "weather", "Yes.", "café", "\n", "1999", "-"]
    rng = np.random.default_rng(0)
    return " ".join(vocabulary[i] for i in rng.integers(0, len(vocabulary), words))


@pytest.mark.parametrize("filler", ["words", "spaces"])
def test_a_huge_row_is_cut_before_it_is_tokenized(builtin_tokenizer, filler):
    # Memory follows the cutoff, not the row: a 50 MB row used to be tokenized whole (4.3 GB).
    # "spaces": the built-in tokenizer folds runs of spaces, so the first piece tried is too short.
    prompt = long_text(40_000) if filler == "words" else "Question:" + " " * 20_000 + long_text(40_000)
    answer = long_text(30_000)
    whole, whole_cut = encode_prompted(Prompted(prompt, answer), builtin_tokenizer, cutoff=None)[0], None
    counting = Counting(builtin_tokenizer)
    bounded, truncated = encode_prompted(Prompted(prompt, answer), counting, cutoff=64)
    whole_cut = whole.input_ids[:64], whole.loss_mask[:64]
    assert truncated and (bounded.input_ids, bounded.loss_mask) == whole_cut
    assert counting.longest < len(prompt) / 4
    # an answer cut at the cutoff: prompt short, answer huge
    short = "Will the user like it?"
    full = encode_prompted(Prompted(short, answer), builtin_tokenizer)[0]
    cut = encode_prompted(Prompted(short, answer), counting, cutoff=100)[0]
    assert cut.input_ids == full.input_ids[:100] and cut.loss_mask == full.loss_mask[:100]


def test_a_huge_preference_prompt_is_cut_at_the_end_it_keeps(builtin_tokenizer):
    prompt, chosen, rejected = long_text(30_000), long_text(20_000), "No."
    for mode in ("keep_end", "keep_start"):
        options = dict(max_length=96, max_prompt_length=64, truncation_mode=mode)
        full = encode_preference(PreferencePrompted(prompt, chosen, rejected), builtin_tokenizer,
                                 max_length=None, max_prompt_length=None)[0]
        counting = Counting(builtin_tokenizer)
        cut, truncated = encode_preference(PreferencePrompted(prompt, chosen, rejected), counting, **options)
        expected_prompt = full.prompt_ids[-64:] if mode == "keep_end" else full.prompt_ids[:64]
        assert truncated and cut.prompt_ids == expected_prompt, mode
        assert cut.chosen_ids == full.chosen_ids[:32] and cut.rejected_ids == full.rejected_ids
        assert counting.longest < len(prompt) / 4


def test_auto_renders_prompt_completion_rows_through_the_chat_template_of_an_instruct_model(char_tokenizer):
    from mlxft.data.templates import schema_and_template

    rows = [Record({"prompt": "Capital of France?", "completion": "Paris."}, "x.jsonl:1")]
    schema, template = schema_and_template(rows, "auto")
    assert (schema, template) == ("completion", "auto")
    assert render(rows[0], schema, template, char_tokenizer) == \
        Prompted("<|user|>\nCapital of France?<|end|>\n<|assistant|>\n", "Paris.<|end|>\n")

    class BaseTokenizer(type(char_tokenizer)):
        chat_template = None

    assert render(rows[0], schema, template, BaseTokenizer()) == Prompted("Capital of France?", "Paris.")
    assert render(rows[0], schema, "plain", char_tokenizer) == Prompted("Capital of France?", "Paris.")
