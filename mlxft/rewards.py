"""Reward functions for online RL (`mlxft rl`), in TRL's form: f(prompts, completions, **columns)
-> one float per completion, where `columns` are the data rows' other fields, one list each (a
row {prompt, answer} gives answer=[...]). Named in a recipe as `module:function` (imported from
the Python path) or `path/to/file.py:function`:

    rl:
      reward_functions: [mlxft.rewards:arithmetic, mlxft.rewards:number_only, my_rewards.py:brevity]

Bundled: `arithmetic` (verifiable: the completion's last number is the row's `answer`),
`number_only` (a format check), `brevity` (shorter is better) and `judge` (an LLM judge over HTTP,
grading against the row's reference answer). A function that raises, or returns anything but one finite number
per completion, stops the run with a one-line error naming it, the prompt and the completion.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from pathlib import Path

import numpy as np

from mlxft.errors import UserError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def arithmetic(prompts, completions, answer, **columns) -> list[float]:
    """1.0 when the last number in the completion equals the row's answer, else 0.0: the final
    number is what an answer like "7 + 5 = 12" commits to."""
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = NUMBER.findall(completion)
        rewards.append(float(bool(numbers) and float(numbers[-1]) == float(expected)))
    return rewards


def number_only(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion is one number and nothing else (spaces and a final period aside)."""
    return [float(bool(re.fullmatch(r"\s*-?\d+(?:\.\d+)?\.?\s*", c))) for c in completions]


def brevity(prompts, completions, **columns) -> list[float]:
    """1.0 for an empty completion, falling linearly to 0.0 at 100 characters: a reward any model
    can earn (the built-in one, which knows no arithmetic, shows the loop working on it)."""
    return [1.0 - min(len(c), 100) / 100 for c in completions]


JUDGE_REFERENCES = ("answer", "reference", "completion", "output")


def judge(prompts, completions, **columns) -> list[float]:
    """The LLM judge of `mlxft eval judge` (mlxft.eval.judge: fixed prompt, temperature 0, a seed)
    grading each completion against the row's reference answer (its 'answer', 'reference',
    'completion' or 'output' field), 0-100 scaled to 0-1. The judge is a model behind an Ollama or
    OpenAI-compatible endpoint (`mlxft serve` is one), named by the environment:
    MLXFT_JUDGE_URL, MLXFT_JUDGE_MODEL, MLXFT_JUDGE_API (ollama, the default, or openai) and
    MLXFT_JUDGE_API_KEY. A reply without a score stops the run (resume it once the judge answers):
    a guessed reward would train the policy on noise."""
    import os

    from mlxft.eval.judge import JUDGE_PROMPT, ask, parse_score

    url, model = os.environ.get("MLXFT_JUDGE_URL"), os.environ.get("MLXFT_JUDGE_MODEL")
    if not url or not model:
        raise UserError("mlxft.rewards:judge needs MLXFT_JUDGE_URL and MLXFT_JUDGE_MODEL set (and MLXFT_JUDGE_API=openai "
                        "for an OpenAI-compatible endpoint)")
    field = next((f for f in JUDGE_REFERENCES if f in columns), None)
    if field is None:
        raise UserError(f"mlxft.rewards:judge needs a reference answer in each row: a field named one of {', '.join(JUDGE_REFERENCES)}")
    rewards = []
    for prompt, completion, reference in zip(prompts, completions, columns[field]):
        reply = ask(url, model, JUDGE_PROMPT.format(question=prompt, reference=reference, response=completion),
                    api=os.environ.get("MLXFT_JUDGE_API", "ollama"), seed=0, api_key=os.environ.get("MLXFT_JUDGE_API_KEY"))
        score = parse_score(reply)
        if score is None:
            raise UserError(f"the judge gave no score from 0 to 100 (reply {reply[:120]!r})")
        rewards.append(score / 100)
    return rewards


def load_reward_function(spec: str):
    """(name, function) for 'module:function' or 'path/to/file.py:function'."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"reward function '{spec}': name it as module:function or path/to/file.py:function")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise UserError(f"reward function '{spec}': no such file {path}")
        module_spec = importlib.util.spec_from_file_location(f"mlxft_rewards_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say what failed, not a traceback into importlib
            raise UserError(f"reward function '{spec}': importing {path} failed ({type(e).__name__}: {e})") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UserError(f"reward function '{spec}': cannot import {where} ({e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"reward function '{spec}': {where} has no function {name}")
    return name, function


def score(functions, prompts: list[str], completions: list[str], columns: dict[str, list]) -> np.ndarray:
    """Rewards [functions, completions] (float64), each function called once on the whole batch."""
    table = np.zeros((len(functions), len(completions)))
    for f, (name, function) in enumerate(functions):
        try:
            values = function(prompts=prompts, completions=completions, **columns)
        except Exception as e:  # any failure of user code stops the run with its context
            raise UserError(f"reward function {name} raised {type(e).__name__}: {e} (first prompt {prompts[0]!r}, "
                            f"completion {completions[0]!r})") from None
        values = list(values) if isinstance(values, (list, tuple, np.ndarray)) else values
        if not isinstance(values, list) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, list) else f"a {type(values).__name__}"
            raise UserError(f"reward function {name} returned {got} for {len(completions)} completions; "
                            "it must return one number per completion")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise UserError(f"reward function {name} returned {value!r} for prompt {prompts[i]!r} and completion "
                                f"{completions[i]!r}; it must return a finite number")
            table[f, i] = float(value)
    return table
