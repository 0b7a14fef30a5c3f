"""Scores of the eval suite: answers against the truth, a method's output against the baseline's.

Pure functions over strings, token lists and numpy arrays; every score is in [0, 1] except KL.
"""

from __future__ import annotations

import difflib
import math
import re
import statistics

import numpy as np
from mlx_lm.utils import common_prefix_len

_NUMBER = re.compile(r"\d+")
_FENCE = re.compile(r"^\s*```")


def number_match(output: str, answer: str) -> float:
    """1 if the first number in `output` is exactly `answer` (digits as written), else 0."""
    found = _NUMBER.search(output)
    return float(found is not None and found.group() == answer.strip())


def contains_word(output: str, answer: str) -> float:
    """1 if `answer` occurs in `output` as a whole word (identifier characters around it differ)."""
    pattern = r"(?<![A-Za-z0-9_])" + re.escape(answer.strip()) + r"(?![A-Za-z0-9_])"
    return float(re.search(pattern, output) is not None)


def first_code_line(output: str) -> str:
    """The first non-blank line of generated code that is not a Markdown fence, stripped."""
    for line in output.splitlines():
        if line.strip() and not _FENCE.match(line):
            return line.strip()
    return ""


def edit_similarity(a: str, b: str) -> float:
    """difflib's similarity ratio: 2·matches / (len(a) + len(b)); 1.0 for two empty strings."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def score_answer(scorer: str, output: str, answer: str) -> float:
    """Score a generated `output` against the task's answer with the task's scorer."""
    if scorer == "number":
        return number_match(output, answer)
    if scorer == "contains":
        return contains_word(output, answer)
    if scorer == "edit":
        return edit_similarity(first_code_line(output), answer.strip())
    raise ValueError(f"Unknown scorer {scorer!r}.")


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> float:
    """KL(p ‖ q) in nats from two log-probability vectors over the same vocabulary."""
    logp = np.asarray(logp, dtype=np.float64)
    logq = np.asarray(logq, dtype=np.float64)
    p = np.exp(logp)
    support = p > 0
    if np.any(np.isneginf(logq[support])):
        return float("inf")
    return float(max(0.0, np.sum(p[support] * (logp[support] - logq[support]))))


def prefix_fraction(a: list[int], b: list[int]) -> float:
    """Common prefix of two greedy continuations over the longer one's length (1 if both empty)."""
    longest = max(len(a), len(b))
    return common_prefix_len(a, b) / longest if longest else 1.0


def by_prompt(records: list[dict]) -> dict[tuple[str, int], dict]:
    """An eval report's per-prompt records keyed by (task, index), for pairing two methods' runs."""
    return {(r["task"], r["index"]): r for r in records}


def paired_accuracy_delta(records: list[dict], base: list[dict]) -> tuple[float, float]:
    """A method's mean accuracy minus the baseline's, in points, and its standard error.

    records[i] and base[i] are the same prompt. The mean accuracy is the mean over tasks of each
    task's mean score, so the difference is too; its standard error combines each task's standard
    error of the mean of per-prompt differences (0 for a task with a single prompt).
    """
    deltas: dict[str, list[float]] = {}
    for r, b in zip(records, base, strict=True):
        deltas.setdefault(r["task"], []).append(100 * (r["score"] - b["score"]))
    means = [statistics.fmean(d) for d in deltas.values()]
    variances = [statistics.variance(d) / len(d) if len(d) > 1 else 0.0 for d in deltas.values()]
    return statistics.fmean(means), math.sqrt(sum(variances)) / len(deltas)
