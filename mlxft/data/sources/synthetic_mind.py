"""The synthetic MIND sample: users with topic tastes, and a check that the signal is there.

Each user likes 1-2 of 8 topics (some topics liked by many users, as news categories are) and
clicks news of those topics far more often (plus a per-news popularity). Titles are 4-8 words drawn from a 30-word vocabulary per topic, so matching the
target title against the liked and disliked titles predicts the click; `mind_signal_report`
measures that with plain baselines. See synthetic.py for how the samples are written.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from mlxft.eval.metrics import roc_auc

DEFAULT_SEED = 20191109  # the first day of MIND-small's logs
_STREAM = 1  # each sample file draws from its own stream of the seed

# Per topic: subcategories, then 14 nouns, 6 adjectives and 10 verbs, no word shared by two topics.
TOPICS = {
    "sports": ("football basketball tennis",
               "coach quarterback playoff stadium league team season striker goalie tournament "
               "referee rookie championship trophy",
               "undefeated veteran injured rival star winning",
               "wins beats signs trades scores defeats clinches drafts benches rallies"),
    "finance": ("markets personalfinance economy",
                "stocks market investors bank inflation earnings dividend mortgage bonds economy "
                "shares budget tariff lender",
                "quarterly fiscal bullish volatile corporate federal",
                "rises falls slashes hikes tumbles rebounds borrows invests lends soars"),
    "health": ("wellness medical nutrition",
               "doctors vaccine diet sleep heart patients hospital vitamin flu therapy cholesterol "
               "nurses symptoms clinic",
               "chronic healthy medical mental daily anxious",
               "heals prevents treats reduces boosts lowers protects cures diagnoses eases"),
    "travel": ("destinations tripideas flights",
               "airline flights passport hotel resort beach cruise island airport luggage tourists "
               "destination itinerary cabin",
               "scenic tropical remote coastal exotic historic",
               "explores visits books lands departs reopens welcomes tours sails cancels"),
    "food": ("recipes restaurants baking",
             "recipe chef pasta dessert bakery pizza soup chicken cheese salad burger cookies "
             "restaurant dinner",
             "spicy crispy homemade vegan delicious creamy",
             "bakes grills roasts serves tastes cooks fries melts stirs garnishes"),
    "tech": ("gadgets software science",
             "smartphone software laptop startup robot chip app hackers gadget algorithm browser "
             "cloud battery processor",
             "wireless digital smart automated encrypted virtual",
             "launches upgrades unveils hacks debugs codes downloads patches crashes powers"),
    "music": ("concerts albums artists",
              "album singer concert band guitar festival song drummer rapper chart orchestra "
              "playlist lyrics vinyl",
              "acoustic platinum indie classical catchy soulful",
              "releases performs sings headlines records tops remixes drops strums streams"),
    "weather": ("forecast storms climate",
                "storm forecast snow rain hurricane temperatures wind flood heatwave drought "
                "tornado frost clouds thunder",
                "freezing humid stormy chilly severe sunny",
                "hits sweeps batters floods soaks blankets warns lingers pounds strikes"),
}
_PREFIXES = ("how", "why", "new", "today")  # shared filler words, no topic
_LINKS = ("after", "amid", "for", "with", "before", "during")

# Tuned so that mind_signal_report's history baselines reach ~0.84-0.89 AUC, well above the
# target-only ones (~0.70 from topic popularity): the click depends mostly on the user, and a
# little on the item, as in MIND where popular news draw clicks from everyone.
P_CLICK_LIKED = 0.85  # before the per-news popularity shift
P_CLICK_OTHER = 0.05
POPULARITY_STD = 0.5  # of the per-news logit shift
TOPIC_SKEW = 1.0  # Zipf exponent of how many users like each topic: some topics are popular, as in MIND
P_SHOW_LIKED = 0.45  # share of a row's impressions drawn from the user's liked topics
OTHER_TOPICS_PER_ROW = 1  # a session also shows one other topic, so dislikes share categories too
ZIPF_EXPONENT = 1.0
P_PREFIX = 0.3  # chance of a leading filler word ("how", "new", ...)
P_LINK = 0.5  # chance of a trailing "after/amid/... noun"


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _zipf(n: int) -> np.ndarray:
    # A few words of each topic are common, as in real headlines; it makes same-topic titles share words.
    w = 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT
    return w / w.sum()


def _title(rng, nouns, adjectives, verbs) -> str:
    """4-8 words: [prefix] [adj] noun verb [adj] noun [link noun], no word twice."""
    noun = [nouns[j] for j in rng.choice(len(nouns), size=3, replace=False, p=_zipf(len(nouns)))]
    adj = [adjectives[j] for j in rng.choice(len(adjectives), size=2, replace=False, p=_zipf(len(adjectives)))]
    verb = verbs[rng.choice(len(verbs), p=_zipf(len(verbs)))]
    words = []
    if rng.random() < P_PREFIX:
        words.append(_pick(rng, _PREFIXES))
    if rng.random() < 0.5:
        words.append(adj[0])
    words += [noun[0], verb]
    if rng.random() < 0.5 or len(words) < 3:
        words.append(adj[1])
    words.append(noun[1])
    if rng.random() < P_LINK:
        words += [_pick(rng, _LINKS), noun[2]]
    return " ".join(words).capitalize()


def make_mind(seed: int = DEFAULT_SEED, *, n_users: int = 300, n_news: int = 400,
              n_rows: int = 3000) -> tuple[list[list[str]], list[list[str]]]:
    """(behaviors rows of 5 columns, news rows of 8 columns), as MIND's tab-separated files hold them."""
    rng = np.random.default_rng([seed, _STREAM])
    topics = list(TOPICS)
    vocab = {t: tuple(part.split() for part in TOPICS[t]) for t in topics}

    news_numbers = rng.choice(np.arange(10000, 100000), size=n_news, replace=False)
    news_topic = np.arange(n_news) % len(topics)
    popularity = rng.normal(0.0, POPULARITY_STD, size=n_news)  # logit shift of every click on this news
    news_rows = []
    for i in range(n_news):
        topic = topics[news_topic[i]]
        subcategories, nouns, adjectives, verbs = vocab[topic]
        sub = _pick(rng, subcategories)
        title = _title(rng, nouns, adjectives, verbs)
        a, b, c = (nouns[j] for j in rng.choice(len(nouns), size=3, replace=False))
        abstract = (f"The latest {topic} story on the {a} and the {b}, with "
                    f"{_pick(rng, adjectives)} details about the {c}.")
        news_id = f"N{news_numbers[i]}"
        url = f"https://example.com/{topic}/{sub}/{news_id.lower()}"
        news_rows.append([news_id, topic, sub, title, abstract, url, "[]", "[]"])

    by_topic = [np.flatnonzero(news_topic == t) for t in range(len(topics))]
    show_weight = [np.exp(0.5 * popularity[ids]) for ids in by_topic]
    show_weight = [w / w.sum() for w in show_weight]

    topic_share = _zipf(len(topics)) ** TOPIC_SKEW
    topic_share /= topic_share.sum()
    user_numbers = rng.choice(np.arange(10000, 100000), size=n_users, replace=False)
    liked_topics, histories = [], []
    for _ in range(n_users):
        liked = sorted(int(t) for t in rng.choice(len(topics), size=1 + int(rng.random() < 0.5),
                                                  replace=False, p=topic_share))
        n_history = 0 if rng.random() < 0.08 else int(rng.integers(1, 21))
        history = []
        for _ in range(n_history):
            t = _pick(rng, liked) if rng.random() < 0.9 else int(rng.integers(len(topics)))
            history.append(f"N{news_numbers[rng.choice(by_topic[t], p=show_weight[t])]}")
        liked_topics.append(liked)
        histories.append(" ".join(dict.fromkeys(history)))  # drop repeats, keep order
    activity = rng.gamma(2.0, size=n_users)
    row_users = rng.choice(n_users, size=n_rows, p=activity / activity.sum())

    start = datetime(2019, 11, 9)
    seconds = np.sort(rng.integers(0, 7 * 86400, size=n_rows))
    behaviors = []
    for r in range(n_rows):
        u = int(row_users[r])
        liked = liked_topics[u]
        others = [t for t in range(len(topics)) if t not in liked]
        others = [others[j] for j in rng.choice(len(others), size=OTHER_TOPICS_PER_ROW, replace=False)]
        n_shown = int(rng.integers(5, 13)) if rng.random() >= 0.03 else int(rng.integers(1, 5))
        shown, tokens = set(), []
        while len(tokens) < n_shown:
            is_liked = rng.random() < P_SHOW_LIKED
            t = _pick(rng, liked if is_liked else others)
            i = int(rng.choice(by_topic[t], p=show_weight[t]))
            if i in shown:
                continue
            shown.add(i)
            base = P_CLICK_LIKED if is_liked else P_CLICK_OTHER
            clicked = rng.random() < _sigmoid(_logit(base) + popularity[i])
            tokens.append(f"N{news_numbers[i]}-{int(clicked)}")
        behaviors.append([str(r + 1), f"U{user_numbers[u]}", _mind_time(start + timedelta(seconds=int(seconds[r]))),
                          histories[u], " ".join(tokens)])
    return behaviors, news_rows


def _mind_time(t: datetime) -> str:
    # Spelled out rather than strftime("%p"), whose AM/PM follows the locale.
    hour = t.hour % 12 or 12
    return f"{t.month:02d}/{t.day:02d}/{t.year} {hour:02d}:{t.minute:02d}:{t.second:02d} " + (
        "AM" if t.hour < 12 else "PM")


# ---------------------------------------------------------------------------------------------
# Is the signal really in the MIND sample?

def mind_signal_report(mind_dir: str | Path, *, min_impressions: int = 5, fit_fraction: float = 0.85) -> dict:
    """Baseline AUCs for the target click of each TALLRec row (every impression but the last is
    liked/disliked context, the last is the target), in plain numpy:

    - history_category_auc: (#liked sharing the target's category) - (#disliked sharing it)
    - title_overlap_auc: words the target title shares with liked titles minus with disliked ones
    - target_category_auc: the target category's positive rate on the first `fit_fraction` of rows
    - target_news_auc: the same per news id (the popularity a model could learn from the item alone)

    The two target-only baselines are scored on the held-out rows; the history baselines on those
    same rows (keys as above) and on all rows (keys ending in _all).
    """
    mind_dir = Path(mind_dir)
    news = {}
    for line in (mind_dir / "news.tsv").read_text(encoding="utf-8").splitlines():
        columns = line.split("\t")
        news[columns[0]] = (columns[1], frozenset(_title_words(columns[3])))
    history_score, overlap_score, target_cat, target_id, labels = [], [], [], [], []
    for line in (mind_dir / "behaviors.tsv").read_text(encoding="utf-8").splitlines():
        shown = [token.rsplit("-", 1) for token in line.split("\t")[4].split()]
        if len(shown) < min_impressions:
            continue
        (tid, tlabel), context = shown[-1], shown[:-1]
        cat, words = news[tid]
        sign = [1 if label == "1" else -1 for _, label in context]
        history_score.append(sum(s for s, (n, _) in zip(sign, context) if news[n][0] == cat))
        overlap_score.append(sum(s * len(words & news[n][1]) for s, (n, _) in zip(sign, context)))
        target_cat.append(cat)
        target_id.append(tid)
        labels.append(int(tlabel))
    y = np.array(labels)
    n_fit = int(len(y) * fit_fraction)
    held = slice(n_fit, None)

    def target_rate(keys):
        # Positive rate per key on the fitted rows; unseen keys get the overall rate.
        overall = y[:n_fit].mean()
        rate = {}
        for key, label in zip(keys[:n_fit], y[:n_fit]):
            hits, count = rate.get(key, (0, 0))
            rate[key] = (hits + label, count + 1)
        return np.array([rate[k][0] / rate[k][1] if k in rate else overall for k in keys[n_fit:]])

    history, overlap = np.array(history_score), np.array(overlap_score)
    return {
        "rows": len(y),
        "held_out_rows": len(y) - n_fit,
        "target_positive_rate": float(y.mean()),
        "history_category_auc": roc_auc(history[held], y[held]),
        "title_overlap_auc": roc_auc(overlap[held], y[held]),
        "target_category_auc": roc_auc(target_rate(target_cat), y[held]),
        "target_news_auc": roc_auc(target_rate(target_id), y[held]),
        "history_category_auc_all": roc_auc(history, y),
        "title_overlap_auc_all": roc_auc(overlap, y),
    }


def _title_words(title: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in title.lower()).split()
