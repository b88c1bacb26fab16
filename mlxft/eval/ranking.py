"""MIND's ranking metrics, as its official evaluation defines them: every candidate of an
impression is scored, and AUC, MRR, nDCG@5 and nDCG@10 are computed per impression, then
averaged over impressions.

    from mlxft.eval.ranking import ranking_report
    ranking_report([(scores_of_impression_1, clicks_1), ...])

Gains are 2^y - 1 and discounts log2(rank + 1), with rank 1 for the highest score. An impression
whose candidates are all clicked or all skipped has no AUC; the official script would fail on it,
so it is left out of every average and counted instead.
"""

from __future__ import annotations

import numpy as np

from mlxft.eval.metrics import roc_auc


def _by_score(labels, scores, k: int | None = None) -> np.ndarray:
    # Highest score first. Ties keep input order (a stable sort), so results never depend on
    # the sort algorithm; the official script's argsort()[::-1] leaves tie order unspecified.
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    return np.asarray(labels, dtype=float)[order[:k]]


def mrr(labels, scores) -> float:
    """Mean reciprocal rank of the clicked candidates: sum(y / rank) / sum(y)."""
    ranked = _by_score(labels, scores)
    return float((ranked / np.arange(1, len(ranked) + 1)).sum() / ranked.sum())


def dcg(labels, scores, k: int) -> float:
    ranked = _by_score(labels, scores, k)
    return float(((2.0 ** ranked - 1.0) / np.log2(np.arange(len(ranked)) + 2.0)).sum())


def ndcg(labels, scores, k: int) -> float:
    """DCG@k of the scores' order over DCG@k of the ideal order."""
    return dcg(labels, scores, k) / dcg(labels, labels, k)


def ranking_report(impressions) -> dict:
    """{auc, mrr, ndcg@5, ndcg@10} averaged over impressions, from (scores, labels) pairs."""
    per = {"auc": [], "mrr": [], "ndcg@5": [], "ndcg@10": []}
    skipped = 0
    for scores, labels in impressions:
        labels = np.asarray(labels, dtype=int)
        if labels.min() == labels.max():
            skipped += 1
            continue
        per["auc"].append(roc_auc(scores, labels))
        per["mrr"].append(mrr(labels, scores))
        per["ndcg@5"].append(ndcg(labels, scores, 5))
        per["ndcg@10"].append(ndcg(labels, scores, 10))
    report = {name: float(np.mean(values)) if values else float("nan") for name, values in per.items()}
    report.update(impressions=len(per["auc"]), skipped_one_class=skipped)
    return report
