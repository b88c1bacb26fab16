"""MIND ranking metrics on hand-made impressions, and `mlxft eval rank` end to end."""

import json
import math

import pytest
from click.testing import CliRunner
from test_mind_converter import write_mind

from mlxft.cli import cli
from mlxft.data.sources.mind import iter_impressions
from mlxft.errors import UserError
from mlxft.eval.ranking import mrr, ndcg, ranking_report

LOG2_3, LOG2_5 = math.log2(3), math.log2(5)


def test_metrics_of_hand_made_impressions():
    # Ranked by score: clicks at ranks 2 and 3.
    assert mrr([0, 1, 1], [0.9, 0.8, 0.1]) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert ndcg([0, 1, 1], [0.9, 0.8, 0.1], 5) == pytest.approx((1 / LOG2_3 + 1 / 2) / (1 + 1 / LOG2_3))
    # Ranked by score: 0.7 (skip), 0.6 (click), 0.4 (skip), 0.2 (click).
    labels, scores = [1, 0, 0, 1], [0.2, 0.7, 0.4, 0.6]
    assert mrr(labels, scores) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert ndcg(labels, scores, 5) == pytest.approx((1 / LOG2_3 + 1 / LOG2_5) / (1 + 1 / LOG2_3))
    assert ndcg(labels, scores, 1) == 0.0  # the top candidate was not clicked
    assert ndcg(labels, [0.9, 0.1, 0.2, 0.8], 10) == pytest.approx(1.0)  # clicks ranked first


def test_report_averages_over_impressions_and_counts_one_class_ones():
    report = ranking_report([([0.9, 0.8, 0.1], [0, 1, 1]),
                             ([0.2, 0.7, 0.4, 0.6], [1, 0, 0, 1]),
                             ([0.5, 0.4], [1, 1])])  # all clicked: no AUC, left out
    assert report["auc"] == pytest.approx((0.0 + 0.25) / 2)
    assert report["mrr"] == pytest.approx(((1 / 2 + 1 / 3) / 2 + (1 / 2 + 1 / 4) / 2) / 2)
    assert report["impressions"] == 2 and report["skipped_one_class"] == 1


def test_impressions_ask_about_every_candidate_with_the_history_as_context(tmp_path):
    write_mind(tmp_path / "mind")
    impressions = dict(iter_impressions(tmp_path / "mind", max_history=1))
    assert list(impressions) == ["1", "2", "3", "4", "5"]
    rows = impressions["5"]
    assert [r["output"] for r in rows] == ["No.", "Yes.", "No.", "Yes.", "No."]
    # Only the most recent History click ("Older trip to Paris") is shown; no candidate's label.
    assert all(r["input"].startswith('User Preference: "Older trip to Paris"\nUser Unpreference: \n') for r in rows)
    assert rows[1]["input"].endswith('target news "Rain expected all week"?')


def test_an_unknown_news_id_is_one_line(tmp_path):
    write_mind(tmp_path / "mind", behaviors=[("1", "U1", "11/11/2019 9:05:58 AM", "N99", "N1-1 N2-0")])
    with pytest.raises(UserError, match="N99 is not in"):
        list(iter_impressions(tmp_path / "mind"))


def test_eval_rank_end_to_end(tiny_model_dir, tmp_path):
    write_mind(tmp_path / "mind")
    result = CliRunner().invoke(cli, ["eval", "rank", "--model", str(tiny_model_dir), "--data", str(tmp_path / "mind"),
                                      "--backend", "mlx", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["candidates"] == 5 + 5 + 3 + 6 + 5
    assert report["impressions"] == 3 and report["skipped_one_class"] == 2  # impressions 1 and 2 are one-class
    assert 0.0 <= report["auc"] <= 1.0 and 0.0 < report["mrr"] <= 1.0
