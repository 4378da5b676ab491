"""Classification scores as GLUE reports them, and their standard errors by bootstrap over the evaluation examples.

Every score is a function of the confusion matrix C (C[true, predicted] = count), computed here with numpy on a
stack of matrices at once, so that a bootstrap of a thousand resamples costs milliseconds:

  accuracy   trace(C) / n
  f1         two classes: F1 of the positive class, label id 1 (MRPC, QQP); more: the unweighted mean of the
             per-class F1 over the classes present in the labels or the predictions (sklearn's average="macro")
  mcc        Matthews correlation (CoLA), for K classes (Gorodkin's R_K, the binary MCC when K = 2):
             (c n - sum_k p_k t_k) / sqrt((n^2 - sum_k p_k^2)(n^2 - sum_k t_k^2)), c correct, p_k predicted and
             t_k true counts of class k; 0 when a factor of the denominator is 0 (one class only), as sklearn

The bootstrap resamples the evaluation examples with replacement: the spread of a score over resamples is the
noise that comes from having n examples and not more. Scores of several seeds are averaged inside each resample,
so the standard error is that of the reported mean; a difference between two models is resampled on the same
examples (paired), which is how two models evaluated on one dev set should be compared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("accuracy", "f1", "mcc")
BOOTSTRAP_SAMPLES = 1000


def confusion(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """C[..., true, predicted] counts over the last axis of (..., n) arrays of label ids."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    lead = predictions.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    codes = labels.reshape(rows, -1) * num_labels + predictions.reshape(rows, -1)
    codes = codes + np.arange(rows)[:, None] * num_labels * num_labels
    counts = np.bincount(codes.ravel(), minlength=rows * num_labels * num_labels)
    return counts.reshape(*lead, num_labels, num_labels)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # 0 where the denominator is 0: the sklearn convention for an undefined precision, recall or correlation.
    safe = np.where(denominator == 0, 1, denominator)
    return np.where(denominator == 0, 0.0, numerator / safe)


def from_confusion(metric: str, c: np.ndarray) -> np.ndarray:
    """`metric` of each confusion matrix in the (..., K, K) stack `c`."""
    c = c.astype(np.float64)
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    true = c.sum(axis=-1)  # t_k
    predicted = c.sum(axis=-2)  # p_k
    n = true.sum(axis=-1)
    if metric == "accuracy":
        return _ratio(tp.sum(axis=-1), n)
    if metric == "f1":
        f1 = _ratio(2 * tp, true + predicted)  # 2 tp / (2 tp + fp + fn)
        if c.shape[-1] == 2:
            return f1[..., 1]
        present = (true + predicted) > 0
        return _ratio((f1 * present).sum(axis=-1), present.sum(axis=-1))
    if metric == "mcc":
        covariance = tp.sum(axis=-1) * n - (predicted * true).sum(axis=-1)
        spread = (n**2 - (predicted**2).sum(axis=-1)) * (n**2 - (true**2).sum(axis=-1))
        return _ratio(covariance, np.sqrt(spread))
    raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")


def score(metric: str, predictions: Sequence[int], labels: Sequence[int], *, num_labels: int) -> float:
    """One score of predicted label ids against the true ones."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not len(labels):
        raise ValueError("no examples to score")
    return float(from_confusion(metric, confusion(np.asarray(predictions), np.asarray(labels), num_labels)))


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], *, num_labels: int) -> dict:
    """{"accuracy", "f1", "mcc", "f1_average"}: binary F1 of label id 1 for two labels, macro F1 for more."""
    scores = {m: score(m, predictions, labels, num_labels=num_labels) for m in METRICS}
    return {**scores, "f1_average": "binary" if num_labels == 2 else "macro"}


def bootstrap(
    metric: str,
    predictions: np.ndarray,
    labels: np.ndarray,
    *,
    num_labels: int,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """`samples` resampled values of the seed-mean score: predictions (seeds, n) of one model, labels (n,).

    The same `seed` draws the same resamples for every model, so the arrays of two models on one task pair up.
    """
    predictions = np.atleast_2d(np.asarray(predictions))
    labels = np.asarray(labels)
    index = np.random.default_rng(seed).integers(0, len(labels), size=(samples, len(labels)))
    resampled = predictions[:, index]  # (seeds, samples, n)
    values = from_confusion(metric, confusion(resampled, np.broadcast_to(labels[index], resampled.shape), num_labels))
    return values.mean(axis=0)


def standard_error(values: np.ndarray) -> float:
    """The bootstrap standard error: the standard deviation of the resampled values."""
    return float(np.std(values, ddof=1))
