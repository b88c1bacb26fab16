"""The built-in model's tokenizer: shipped, rebuilt by the factory to the same bytes, loadable as a
HF tokenizer."""

import hashlib

from mlxft.builtin_factory import corpus_lines, write_tokenizer
from mlxft.data.encode import answer_token_ids, encode_prompted
from mlxft.data.records import Record
from mlxft.data.sources.mind import INSTRUCTION
from mlxft.data.templates import render
from mlxft.models.builtin import PACKAGED, builtin_dir, tokenizer_dir


def test_the_factory_rebuilds_the_shipped_tokenizer(tmp_path):
    # What the shipped weights were trained with: a tokenizer the factory no longer builds would
    # mean a model whose embedding rows are other tokens' than the data's.
    write_tokenizer(tmp_path, corpus_lines())
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        rebuilt, shipped = ((folder / name).read_bytes() for folder in (tmp_path, PACKAGED))
        assert hashlib.sha256(rebuilt).hexdigest() == hashlib.sha256(shipped).hexdigest(), name


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


def test_cache_folder_is_named_by_the_shipped_files(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXFT_HOME", str(tmp_path))
    assert builtin_dir().parent == tmp_path and builtin_dir().name.startswith("builtin-")
    assert tokenizer_dir() == builtin_dir()  # copied from the package on first use
    assert (builtin_dir() / "model.safetensors").read_bytes() == (PACKAGED / "model.safetensors").read_bytes()


def test_mlx_lm_loads_it(builtin_tokenizer):
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    folder = tokenizer_dir()
    wrapper = load_mlx_tokenizer(folder)
    assert wrapper.encode("Yes.", add_special_tokens=False) == builtin_tokenizer.encode("Yes.", add_special_tokens=False)


def test_pretraining_texts_hold_no_answers_and_no_evaluation_rows():
    from mlxft.builtin_factory import pretraining_rows
    from mlxft.data.sources.mind import iter_tallrec_rows
    from mlxft.data.templates import alpaca_prompt
    from mlxft.resources import bundled

    texts = [row["text"] for row in pretraining_rows()]
    assert len(texts) > 1000
    assert all(text.endswith("### Response:\n") for text in texts)  # the prompt only, never "Yes."/"No."
    bundled_prompts = {alpaca_prompt(r["instruction"], r["input"]) for r in iter_tallrec_rows(bundled("data/mind-sample"),
                                                                                               max_history=10)}
    assert not bundled_prompts & set(texts)
