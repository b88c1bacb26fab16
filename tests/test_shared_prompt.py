"""The shared-prompt layout of a pair batch (mlxft.data.shared_prompt): where each token goes,
what is scored, what each position may attend to, and the tokens it saves."""

import numpy as np
import pytest

from mlxft.data.batching import collate_pairs
from mlxft.data.encode import PreferenceExample
from mlxft.data.shared_prompt import padded_width, pair_inputs, share_prompts

PAD = 0


def layout_of(pairs, multiple=1):
    pb = collate_pairs(pairs, range(len(pairs)), pad_id=PAD)
    return pb, share_prompts(pb.batch, PAD, multiple)


def test_prompts_are_left_padded_and_answers_follow_at_restarted_positions():
    pairs = [PreferenceExample([11, 12, 13], [21, 22], [31, 32, 33]),
             PreferenceExample([14], [23], [34, 35])]
    _, x = layout_of(pairs)
    assert x.prompt_ids.tolist() == [[11, 12, 13], [PAD, PAD, 14]]
    assert x.answer_ids.tolist() == [[21, 22, PAD], [23, PAD, PAD], [31, 32, 33], [34, 35, PAD]]
    assert x.weights.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert x.positions.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5]  # prompt, chosen, rejected again at 3
    assert (x.prompt_lengths.tolist(), x.answer_lengths.tolist()) == ([3, 1], [2, 1, 3, 2])
    assert x.computed_tokens == 3 + 1 + 2 + 1 + 3 + 2
    assert x.computed_positions == 2 * 9


def test_each_position_sees_its_prompt_and_its_own_answer_only():
    pairs = [PreferenceExample([11, 12, 13], [21, 22], [31, 32, 33]), PreferenceExample([14], [23], [34, 35])]
    _, x = layout_of(pairs)
    p, a = 3, 3
    second = x.mask[1, 0].astype(int)  # the pair whose prompt is one real token after two pads
    # Prompt rows: causal over real tokens; a pad sees only itself.
    assert second[:p, :p].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    chosen, rejected = second[p:p + a], second[p + a:]
    for rows, own in ((chosen, slice(p, p + a)), (rejected, slice(p + a, p + 2 * a))):
        assert (rows[:, :p] == [0, 0, 1]).all()  # the real prompt token, never its pads
        assert rows[:, own].tolist() == np.tril(np.ones((a, a), int)).tolist()
    assert chosen[:, p + a:].sum() == 0 and rejected[:, p:p + a].sum() == 0  # the answers never see each other
    assert x.mask.shape == (2, 1, p + 2 * a, p + 2 * a) and x.mask.dtype == bool


def test_scored_tokens_are_those_of_the_rows():
    # Answers with a common start stay answers: the prompt ends at the first scored token. A pair
    # a cut left without a prompt keeps its first answer token unscored, as in its rows.
    pairs = [PreferenceExample([11, 12], [7, 7, 21], [7, 7, 31, 32]), PreferenceExample([], [23, 24], [34])]
    pb, x = layout_of(pairs)
    assert x.prompt_lengths.tolist() == [2, 0]
    assert x.weights.sum() == pb.batch.loss_mask.sum() == 3 + 4 + 1 + 0
    assert x.answer_ids[0].tolist() == [7, 7, 21, PAD] and x.weights[1].tolist() == [0, 1, 0, 0]
    scored_rows = sorted(int(t) for row, m in zip(pb.batch.input_ids, pb.batch.loss_mask) for t in row[m.astype(bool)])
    assert sorted(int(t) for t in x.answer_ids[x.weights.astype(bool)]) == scored_rows


def test_widths_round_up_and_the_rows_layout_is_kept_when_not_shared():
    rng = np.random.default_rng(0)
    pairs = [PreferenceExample(rng.integers(3, 99, n).tolist(), rng.integers(3, 99, 5).tolist(), rng.integers(3, 99, 6).tolist())
             for n in (9, 13)]
    pb, x = layout_of(pairs, multiple=4)
    assert x.prompt_ids.shape == (2, 16) and x.answer_ids.shape == (4, 8)
    assert x.computed_tokens == 9 + 13 + 2 * 5 + 2 * 6  # padding is not counted...
    assert x.computed_tokens < pb.tokens == 2 * (9 + 13) + 2 * 5 + 2 * 6  # ...and each prompt runs once
    rows = pair_inputs(pb.batch, PAD, shared=False, pad_to_multiple=4)
    assert set(rows) == {"inputs", "positions", "tokens", "weights"} and rows["inputs"].shape[0] == 4
    assert set(pair_inputs(pb.batch, PAD, shared=True, pad_to_multiple=4)) == {"prompt_ids", "answer_ids", "mask", "weights"}


def test_few_widths_bound_both_the_padding_and_the_number_of_widths():
    assert [padded_width(n, 4) for n in (0, 1, 5, 63, 64, 65, 130, 700)] == [4, 4, 8, 64, 64, 68, 132, 700]
    coarse = [padded_width(n, 4, few_widths=True) for n in range(1, 1025)]
    assert coarse[:64] == [padded_width(n, 4) for n in range(1, 65)]  # short rows: the plain multiple
    assert [padded_width(n, 4, few_widths=True) for n in (65, 130, 700)] == [72, 144, 704]
    assert all(w >= n and (w - n) / n < 0.125 for n, w in zip(range(1, 1025), coarse) if n >= 64)
    assert len(set(coarse)) == 16 + 4 * 8  # 4..64 by 4, then 8 widths an octave up to 1024


def test_an_odd_number_of_rows_is_not_a_pair_batch():
    pb, _ = layout_of([PreferenceExample([1, 2], [3], [4])])
    pb.batch.input_ids = pb.batch.input_ids[:1]
    with pytest.raises(ValueError, match="even number of rows"):
        share_prompts(pb.batch, PAD)
