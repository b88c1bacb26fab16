"""The built-in tokenizer: built offline, the same bytes every time, loadable as a HF tokenizer."""

import hashlib

from mlxft.builtin import builtin_dir, corpus_lines, tokenizer_dir, write_tokenizer
from mlxft.data.encode import answer_token_ids, encode_prompted
from mlxft.data.records import Record
from mlxft.data.sources.mind import INSTRUCTION
from mlxft.data.templates import render


def test_build_is_deterministic(tmp_path):
    lines = corpus_lines()
    digests = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        write_tokenizer(folder, lines)
        digests.append(hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_loads_and_round_trips(builtin_tokenizer):
    text = 'User Preference: "Rookie drafts winning coach"\nnaïve 2024 ✓'
    ids = builtin_tokenizer.encode(text, add_special_tokens=False)
    assert builtin_tokenizer.decode(ids) == text  # byte fallback: nothing becomes <unk>
    assert builtin_tokenizer.unk_token_id not in ids
    assert builtin_tokenizer.encode("hi")[0] == builtin_tokenizer.bos_token_id == 1
    assert builtin_tokenizer.eos_token_id == 2


def test_yes_and_no_are_single_pieces(builtin_tokenizer):
    yes, no = answer_token_ids(builtin_tokenizer, ["Yes.", "No."])
    assert builtin_tokenizer.convert_ids_to_tokens([yes, no]) == ["▁Yes", "▁No"]


def test_tallrec_row_mask_on_the_real_tokenizer(builtin_tokenizer):
    row = Record({"instruction": INSTRUCTION, "input": 'User Preference: "a"\nUser Unpreference: \n'
                  'Whether the user will like the target news "b"?', "output": "Yes."}, "x")
    example, _ = encode_prompted(render(row, "alpaca", "alpaca"), builtin_tokenizer)
    scored = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    assert builtin_tokenizer.convert_ids_to_tokens(scored) == ["▁Yes", ".", "</s>"]
    assert example.loss_mask[-3:] == [1, 1, 1] and sum(example.loss_mask) == 3


def test_chat_template_is_shipped(builtin_tokenizer):
    text = builtin_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_cache_folder_is_named_by_its_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXFT_HOME", str(tmp_path))
    assert builtin_dir().parent == tmp_path and builtin_dir().name.startswith("builtin-")


def test_mlx_lm_loads_it(builtin_tokenizer):
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    folder = tokenizer_dir()
    wrapper = load_mlx_tokenizer(folder)
    assert wrapper.encode("Yes.", add_special_tokens=False) == builtin_tokenizer.encode("Yes.", add_special_tokens=False)


def test_pretraining_texts_hold_no_answers_and_no_evaluation_rows():
    from mlxft.builtin import pretraining_rows
    from mlxft.data.sources.mind import iter_tallrec_rows
    from mlxft.data.templates import alpaca_prompt
    from mlxft.resources import bundled

    texts = [row["text"] for row in pretraining_rows()]
    assert len(texts) > 1000
    assert all(text.endswith("### Response:\n") for text in texts)  # the prompt only, never "Yes."/"No."
    bundled_prompts = {alpaca_prompt(r["instruction"], r["input"]) for r in iter_tallrec_rows(bundled("data/mind-sample"),
                                                                                               max_history=10)}
    assert not bundled_prompts & set(texts)
