"""DPO loss math, once, for every backend: pure functions over arrays of an `xp` namespace
(numpy, mlx.core or torch), using only arithmetic, `xp.logaddexp`, `xp.maximum`, `xp.sign`,
`xp.exp`, `xp.log1p` and `xp.zeros_like`, which the three spell the same way.

    losses, chosen_rewards, rejected_rewards = dpo_losses(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected,
        beta=0.1, loss_type="sigmoid", xp=mx)

Inputs are per-pair sequence log-probabilities of the answers (summed over the answer's tokens,
or their mean: see `uses_mean_logps`). With Δ = (log πθ(y_w) − log πref(y_w)) − (log πθ(y_l) −
log πref(y_l)) and ε the label smoothing, the per-pair losses are TRL's:

    sigmoid  −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)            (DPO; ε > 0 is conservative DPO)
    ipo      (Δ − 1/(2β))²                          (on length-normalised log-probs)
    hinge    relu(1 − βΔ)                           (SLiC)
    robust   (−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1−2ε)

Two need no reference (its log-probs are ignored; the trainers skip its forward), and both work
on length-normalised log-probs, as TRL's CPOTrainer (SimPO) and ORPOTrainer compute them:

    simpo    −logσ(β·(log πθ(y_w) − log πθ(y_l)) − γ)             (γ: simpo_gamma)
    orpo     −log πθ(y_w) − β·logσ(log odds(y_w) − log odds(y_l)),  odds(y) = p / (1 − p), p = πθ(y)

ORPO's first term is the SFT loss on the chosen answer (its mean token NLL) and β is the paper's λ;
their rewards are β·log πθ, as TRL logs them.

KTO (TRL's KTOTrainer) takes unpaired rows, each answer labelled desirable or not. With
r = log πθ(y) − log πref(y) (sums over the answer) and z₀ the batch's mean of the same ratio on
mismatched answers (each prompt with another row's answer), clamped at 0 and not differentiated:

    kto      desirable: λ_D·(1 − σ(β(r − z₀)));  undesirable: λ_U·(1 − σ(β(z₀ − r)))

A KTO batch rides on the pair layout: the "chosen" rows are each prompt with its own answer, the
"rejected" rows the mismatched answers that estimate z₀ (mlxft.data.dataset.kto_pairs).

Rewards are β·(log πθ − log πref); callers log them and must not differentiate through them
(they are metrics). A backend reduces the per-pair losses itself (a sum over a micro-batch,
divided by the pairs of the whole optimizer step), so accumulation stays exact.
"""

from __future__ import annotations

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


def log_sigmoid(x, xp):
    """log σ(x) = −log(1 + e^−x), stable for large |x|."""
    return -xp.logaddexp(xp.zeros_like(x), -x)


def uses_mean_logps(loss_type: str, average_log_prob: bool) -> bool:
    """IPO, SimPO and ORPO are defined on length-normalised log-probs (TRL does the same); the
    others sum unless `average_log_prob` asks for the mean."""
    return average_log_prob or loss_type in ("ipo", "simpo", "orpo")


def needs_reference(loss_type: str) -> bool:
    return loss_type not in REFERENCE_FREE


def dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.5, xp):
    """(per-pair losses, chosen rewards, rejected rewards), each shaped like the inputs."""
    check_loss_settings(loss_type, beta, label_smoothing)
    if loss_type == "simpo":
        losses = -log_sigmoid(beta * (policy_chosen - policy_rejected) - simpo_gamma, xp)
        return losses, beta * policy_chosen, beta * policy_rejected
    if loss_type == "orpo":
        # log(p / (1 - p)) = log p - log(1 - exp(log p)); log p < 0 for any answer of a token or more
        log_odds = (policy_chosen - policy_rejected) - (xp.log1p(-xp.exp(policy_chosen)) - xp.log1p(-xp.exp(policy_rejected)))
        losses = -policy_chosen - beta * log_sigmoid(log_odds, xp)
        return losses, beta * policy_chosen, beta * policy_rejected
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * log_sigmoid(beta * delta, xp) - eps * log_sigmoid(-beta * delta, xp)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        margin = 1 - beta * delta
        losses = xp.maximum(margin, xp.zeros_like(margin))
    else:  # robust
        losses = (-(1 - eps) * log_sigmoid(beta * delta, xp) + eps * log_sigmoid(-beta * delta, xp)) / (1 - 2 * eps)
    return losses, beta * chosen_ratio, beta * rejected_ratio


def check_loss_settings(loss_type: str, beta: float, label_smoothing: float) -> None:
    """ValueError for settings the losses are undefined for (config.py turns them into UserErrors
    before any model loads)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("ipo", "hinge", "simpo", "orpo", "kto"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss_type}")


def pair_accuracies(chosen_rewards, rejected_rewards, xp):
    """Per pair: 1 when the chosen answer's reward is higher, 0 when lower, ½ on a tie.

    TRL counts ties as 0, so its accuracy at step 0 (policy == reference, every reward 0) is 0;
    here it is 0.5, the chance level it is, and rises from there."""
    return (xp.sign(chosen_rewards - rejected_rewards) + 1) / 2


# What a step or an evaluation reports, under TRL's names, as sums that add up across
# micro-batches and reports: per-pair values summed over pairs, logits summed over answer tokens.
STATISTICS = ("pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "tokens/chosen", "tokens/rejected")


def pair_statistics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, logit_sums,
                    token_counts, xp):
    """One vector of STATISTICS sums for a batch of B pairs. `logit_sums` [2B] holds, per row, the
    sum over its answer tokens of the mean logit over the vocabulary; `token_counts` [2B] the
    answer tokens (chosen rows first, as in the batch)."""
    b = losses.shape[0]
    sums = [xp.zeros_like(losses).sum() + b, losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
            pair_accuracies(chosen_rewards, rejected_rewards, xp).sum(), (chosen_rewards - rejected_rewards).sum(),
            policy_chosen.sum(), policy_rejected.sum(), logit_sums[:b].sum(), logit_sums[b:].sum(),
            token_counts[:b].sum(), token_counts[b:].sum()]
    return xp.stack(sums)


def summarize(sums) -> dict:
    """{'loss', 'rewards/chosen', ...} from summed STATISTICS: means over pairs; logits/* are the
    mean logit over the answer tokens and the vocabulary (as TRL logs them)."""
    total = dict(zip(STATISTICS, (float(v) for v in sums)))
    pairs = max(total["pairs"], 1.0)
    metrics = {"loss": total["loss"] / pairs}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        metrics[name] = total[name] / pairs
    for side in ("chosen", "rejected"):
        metrics[f"logits/{side}"] = total[f"logits/{side}"] / max(total[f"tokens/{side}"], 1.0)
    return metrics


def kto_losses(policy, policy_mismatched, reference, reference_mismatched, desirable, *, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0, xp, detach):
    """(per-row losses, rewards β·r, z₀) for rows labelled `desirable` (1.0) or not (0.0)."""
    z0 = detach(policy_mismatched - reference_mismatched).mean()
    z0 = xp.maximum(z0, xp.zeros_like(z0))
    ratio = policy - reference
    # 1 − σ(x) = σ(−x) = exp(log σ(−x)): the same three operations in numpy, MLX and torch
    desirable_losses = desirable_weight * xp.exp(log_sigmoid(-beta * (ratio - z0), xp))
    undesirable_losses = undesirable_weight * xp.exp(log_sigmoid(-beta * (z0 - ratio), xp))
    return desirable * desirable_losses + (1 - desirable) * undesirable_losses, beta * ratio, z0


KTO_STATISTICS = ("rows", "loss", "desirable", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")


def statistic_names(loss_type: str) -> tuple[str, ...]:
    return KTO_STATISTICS if loss_type == "kto" else STATISTICS


def summarizer(loss_type: str):
    """summarize(sums) -> metrics for the loss type (KTO's rewards are means over the desirable
    rows, or the undesirable ones; its kl is z₀, averaged over rows)."""
    if loss_type != "kto":
        return summarize

    def summarize_kto(sums) -> dict:
        total = dict(zip(KTO_STATISTICS, (float(v) for v in sums)))
        rows, desirable = max(total["rows"], 1.0), total["desirable"]
        chosen, rejected = max(desirable, 1.0), max(total["rows"] - desirable, 1.0)
        metrics = {"loss": total["loss"] / rows, "rewards/chosen": total["rewards/chosen"] / chosen,
                   "rewards/rejected": total["rewards/rejected"] / rejected}
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics.update({"logps/chosen": total["logps/chosen"] / chosen, "logps/rejected": total["logps/rejected"] / rejected,
                        "kl": total["kl"] / rows})
        return metrics

    return summarize_kto


def pair_objective(logps, logit_sums, counts, reference, dc, *, xp, detach, labels=None):
    """(sum of the batch's pair losses, STATISTICS sums) from per-row answer log-prob sums [2B]
    (chosen rows, then rejected), the rows' logit sums and answer token counts, and the reference's
    log-prob sums [2B]; `dc` is the run's DPO config, `detach` the backend's stop-gradient. The
    statistics are metrics: no gradient flows through them."""
    if uses_mean_logps(dc.loss_type, dc.average_log_prob):
        logps, reference = logps / counts, reference / counts
    b = logps.shape[0] // 2
    if dc.loss_type == "kto":  # labels [B]: 1.0 for a desirable answer
        losses, rewards, z0 = kto_losses(logps[:b], logps[b:], reference[:b], reference[b:], labels, beta=dc.beta,
                                         desirable_weight=dc.desirable_weight, undesirable_weight=dc.undesirable_weight,
                                         xp=xp, detach=detach)
        r, lp = detach(rewards), detach(logps[:b])
        sums = [xp.zeros_like(r).sum() + b, detach(losses).sum(), labels.sum(), (r * labels).sum(), (r * (1 - labels)).sum(),
                (lp * labels).sum(), (lp * (1 - labels)).sum(), z0 * b]
        return losses.sum(), xp.stack(sums)
    losses, chosen_rewards, rejected_rewards = dpo_losses(logps[:b], logps[b:], reference[:b], reference[b:], beta=dc.beta,
                                                          loss_type=dc.loss_type, label_smoothing=dc.label_smoothing,
                                                          simpo_gamma=dc.simpo_gamma, xp=xp)
    sums = pair_statistics(*map(detach, (losses, chosen_rewards, rejected_rewards, logps[:b], logps[b:], logit_sums)), counts, xp=xp)
    return losses.sum(), sums
