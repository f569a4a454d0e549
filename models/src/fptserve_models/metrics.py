"""Validation metrics in NumPy: accuracy, macro one-vs-rest AUC, quadratic-weighted kappa."""

from __future__ import annotations

import math

import numpy as np


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return float((labels == predicted).mean()) if labels.size else math.nan


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + P(tie) / 2
    (Mann-Whitney U with midranks). NaN when one of the two groups is empty."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _midranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean over classes of the one-vs-rest AUC of that class's probability, over the classes
    that have both positives and negatives in ``labels`` (NaN if none)."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    values = [binary_auc(labels == c, probabilities[:, c]) for c in range(probabilities.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def quadratic_weighted_kappa(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (i - j)^2 / (C - 1)^2, for ordered grades:
    1 - sum(W * O) / sum(W * E), O the confusion counts, E the outer product of the two
    marginals / N. NaN when the expected disagreement is zero (one class only)."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    c = int(num_classes)
    observed = np.zeros((c, c), dtype=np.float64)
    np.add.at(observed, (labels, predicted), 1.0)
    n = observed.sum()
    if n == 0 or c < 2:
        return math.nan
    expected = np.outer(observed.sum(1), observed.sum(0)) / n
    i, j = np.indices((c, c))
    weights = (i - j) ** 2 / float((c - 1) ** 2)
    denominator = float((weights * expected).sum())
    if denominator == 0.0:
        return math.nan
    return float(1.0 - (weights * observed).sum() / denominator)


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Loss (mean cross-entropy), accuracy, macro AUC and quadratic-weighted kappa."""
    labels = np.asarray(labels, dtype=np.int64)
    p = softmax64(logits)
    predicted = p.argmax(1)
    loss = float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-300, None)).mean()) if len(labels) else math.nan
    return {
        "loss": loss,
        "accuracy": accuracy(labels, predicted),
        "auc": macro_auc(labels, p),
        "kappa": quadratic_weighted_kappa(labels, predicted, p.shape[1]),
    }
