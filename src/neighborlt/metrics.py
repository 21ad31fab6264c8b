"""Pure long-tail metrics: overall / many / medium / few top-1, per-class accuracy, balanced error, worst-class
accuracy and the harmonic mean of the splits; no files, no models (the training engine and ``neighborlt.evaluate``
both use these, so neither imports the other).

Conventions (the ones long-tail papers use, e.g. OLTR / Decoupling's ``shot_acc``):

* Accuracies and errors are percentages (0..100).
* ``overall`` is top-1 over all test samples. A split's accuracy (``many`` / ``medium`` / ``few``) is the mean of
  the per-class accuracies of the classes in that split that have at least one test sample.
* Split membership uses the *training* image count ``n``: few when ``n < few``, many when ``n > many``, medium
  otherwise (defaults :data:`~neighborlt.defaults.MANY_SHOT` = 100 and :data:`~neighborlt.defaults.FEW_SHOT` = 20).
* A split with no evaluable class has accuracy ``None``; a class with no test samples has accuracy ``None`` and is
  left out of every average.
* Logits are turned into predictions by ``numpy.argmax`` (ties go to the lowest class index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .data.shots import shot_groups
from .defaults import FEW_SHOT, MANY_SHOT, SHOT_THRESHOLDS
from .errors import ConfigError, DataError

__all__ = ["ECE_BINS", "SCHEMA", "SPLITS", "evaluate_predictions", "expected_calibration_error", "shot_accuracy",
           "target_accuracy"]

SPLITS = ("many", "medium", "few")
SCHEMA = 1
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (as the paper's official code)


# --------------------------------------------------------------------------------------------- metrics


def _as_predictions(predictions: Any, n: int, num_outputs: int, what: str) -> np.ndarray:
    """Predicted class indices int64 [N] from indices [N] or logits [N, C] (argmax, lowest index on ties)."""
    p = np.asarray(predictions)
    if p.ndim == 2:
        if p.shape[1] > num_outputs:
            raise DataError(
                f"{what}: logits have {p.shape[1]} columns but the model has {num_outputs} classes; "
                "evaluate the exported direct classifier or pass num_outputs"
            )
        if not np.issubdtype(p.dtype, np.number):
            raise DataError(f"{what}: logits must be numbers, got dtype {p.dtype}")
        if p.shape[0] and p.shape[1] == 0:
            raise DataError(f"{what}: logits have zero columns")
        if np.isnan(p).any():
            bad = int(np.flatnonzero(np.isnan(p).any(axis=1))[0])
            raise DataError(f"{what}: logits of sample {bad} contain NaN; check the model or the predictions file")
        p = p.argmax(axis=1) if p.shape[0] else np.zeros(0, dtype=np.int64)
    elif p.ndim != 1:
        raise DataError(f"{what}: predictions must be class indices [N] or logits [N, C], got shape {p.shape}")
    if len(p) != n:
        raise DataError(f"{what}: {len(p)} predictions but {n} labels; both must describe the same test samples")
    return _class_indices(p, num_outputs, what, "prediction", "predictions must be class indices of the model")


def _class_indices(a: np.ndarray, upper: int, what: str, kind: str, fix: str) -> np.ndarray:
    """``a`` as int64 class indices in ``0..upper-1`` (integral floats accepted); else a one-line DataError."""
    integral = np.issubdtype(a.dtype, np.integer) or (
        np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)))
    if len(a) and not integral:
        raise DataError(f"{what}: {kind}s must be integer class indices, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if len(a) and (a.min() < 0 or a.max() >= upper):
        bad = int(np.flatnonzero((a < 0) | (a >= upper))[0])
        raise DataError(f"{what}: {kind} {int(a[bad])} of sample {bad} is out of range 0..{upper - 1}; {fix}")
    return a


def check_labels(labels: Any, num_classes: int, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"{what}: labels must be a 1-D array of class indices, got shape {y.shape}")
    y = _class_indices(y, num_classes, what, "label",
                       f"{num_classes} classes have training counts; fix the labels or the class list")
    return y


def check_counts(train_counts: Any, what: str) -> np.ndarray:
    c = np.asarray(train_counts)
    if c.ndim != 1 or len(c) == 0:
        raise DataError(f"{what}: train_counts must be a non-empty 1-D array (one count per class), got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.number) or np.any(c < 0) or np.any(c != np.round(c)):
        raise DataError(f"{what}: train_counts must be non-negative integers")
    return c.astype(np.int64)


def cap_per_class(image_set: Any, per_class: int | None) -> Any:
    """The first ``per_class`` images of every class of an ImageSet (all of them when None): the capped test set a
    run is scored on (``max_test_per_class``), the same images in training, evaluation and the grids."""
    if per_class is None:
        return image_set
    labels = np.asarray(image_set.labels)
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(image_set.num_classes)]
    return image_set.subset(np.sort(np.concatenate([*keep, np.zeros(0, dtype=np.int64)])))


def _per_class(pred: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    n_test = np.bincount(y, minlength=num_classes).astype(np.int64)
    correct = np.bincount(y[pred == y], minlength=num_classes).astype(np.int64)
    return n_test, correct


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _harmonic(values: Sequence[float]) -> float | None:
    if not values:
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return float(len(values) / sum(1.0 / v for v in values))


def shot_accuracy(
    predictions: Any,
    labels: Any,
    train_counts: Any,
    many: int = MANY_SHOT,
    few: int = FEW_SHOT,
    *,
    num_outputs: int | None = None,
) -> dict[str, float | None]:
    """Top-1 accuracy overall and on the many / medium / few splits.

    Args:
        predictions: predicted class indices [N] or logits [N, C] (argmax; ties go to the lowest index).
        labels: true class indices [N] in ``0..len(train_counts)-1``.
        train_counts: training images per class; decides each class's split.
        many: classes with more than ``many`` training images are "many".
        few: classes with fewer than ``few`` training images are "few"; the rest "medium".
        num_outputs: number of model outputs when it exceeds the number of classes (e.g. the L + K outputs of
            a model trained with auxiliary classes, not yet masked); predictions of the extra classes count as
            wrong. Defaults to ``len(train_counts)``.

    Returns:
        ``{"overall", "many", "medium", "few"}`` in percent; a split without any class that has test
        samples is ``None``; ``overall`` is ``None`` for an empty test set.

    Raises:
        DataError: mismatched lengths, labels or predictions out of range, bad shapes.

    Example:
        >>> shot_accuracy([0, 1, 1], [0, 1, 2], [500, 50, 5])
        {'overall': 66.66666666666666, 'many': 100.0, 'medium': 100.0, 'few': 0.0}
    """
    m = _compute(predictions, labels, train_counts, many=many, few=few, num_outputs=num_outputs)
    return {"overall": m["overall"], **{s: m[s] for s in SPLITS}}


def _compute(
    predictions: Any,
    labels: Any,
    train_counts: Any,
    *,
    many: int,
    few: int,
    num_outputs: int | None,
    what: str = "predictions",
) -> dict[str, Any]:
    counts = check_counts(train_counts, what)
    num_classes = len(counts)
    y = check_labels(labels, num_classes, what)
    outputs = num_classes if num_outputs is None else int(num_outputs)
    if outputs < num_classes:
        raise ConfigError(f"num_outputs={outputs} is below the {num_classes} classes; pass at least {num_classes}")
    pred = _as_predictions(predictions, len(y), outputs, what)
    groups = shot_groups(counts, many=many, few=few)
    n_test, correct = _per_class(pred, y, num_classes)
    has_test = n_test > 0
    acc = np.full(num_classes, np.nan)
    acc[has_test] = 100.0 * correct[has_test] / n_test[has_test]
    out: dict[str, Any] = {
        "overall": 100.0 * float((pred == y).mean()) if len(y) else None,
        "groups": groups,
        "n_test": n_test,
        "correct": correct,
        "acc": acc,
        "counts": counts,
        "pred": pred,
        "y": y,
    }
    for s in SPLITS:
        out[s] = _mean_or_none(acc[(groups == s) & has_test])
    return out


def expected_calibration_error(logits: Any, labels: Any, num_target: int | None = None,
                               bins: int = ECE_BINS) -> float | None:
    """Expected calibration error (%) of the top-1 prediction over the target rows.

    ``softmax`` of ``logits[:, :num_target]`` (the auxiliary rows ``num_target..`` of a joint model are masked, so
    the confidences are those of the direct classifier over the L targets); each sample's top-1 confidence falls
    in one of ``bins`` equal-width bins of ``[0, 1]`` (``(k/bins, (k+1)/bins]``, the first bin also holds 0);
    ``ECE = sum_k |B_k| / N * |accuracy(B_k) - mean confidence(B_k)|``, times 100.

    Args:
        logits: float [N, C >= num_target].
        labels: true target indices [N].
        num_target: L; None: every column is a target.
        bins: number of bins (default :data:`ECE_BINS` = 15).

    Returns:
        The ECE in percent (0..100), or None for an empty test set.

    Example:
        >>> round(expected_calibration_error([[2.0, 0.0], [0.0, 0.0]], [0, 1], bins=2), 2)
        30.96
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise DataError(f"ECE needs logits [N, C], got shape {z.shape}")
    y = np.asarray(labels).astype(np.int64)
    if len(y) != len(z):
        raise DataError(f"ECE: {len(z)} logit rows but {len(y)} labels")
    if bins < 1:
        raise ConfigError(f"ECE bins must be >= 1, got {bins}")
    if len(y) == 0:
        return None
    z = z[:, : (z.shape[1] if num_target is None else int(num_target))]
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(np.float64)
    # bin k holds (k/bins, (k+1)/bins]; confidence 0 (impossible with a softmax) goes to bin 0
    k = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    acc_sum = np.bincount(k, weights=correct, minlength=bins)
    conf_sum = np.bincount(k, weights=conf, minlength=bins)
    return float(100.0 * np.abs(acc_sum - conf_sum).sum() / len(y))


def evaluate_predictions(
    predictions: Any,
    labels: Any,
    train_counts: Any,
    class_names: Sequence[str],
    many: int = MANY_SHOT,
    few: int = FEW_SHOT,
    *,
    num_outputs: int | None = None,
) -> dict[str, Any]:
    """All long-tail metrics of one set of predictions, as a JSON-ready dict (the content of ``metrics.json``).

    Args:
        predictions: predicted class indices [N] or logits [N, C].
        labels: true class indices [N].
        train_counts: training images per class (length C).
        class_names: name of each class (length C).
        many: "many" threshold (more than ``many`` training images).
        few: "few" threshold (fewer than ``few`` training images).
        num_outputs: see :func:`shot_accuracy`.

    Returns:
        A dict with ``overall``, ``many``, ``medium``, ``few`` (percent or ``None``), ``balanced_accuracy``
        (mean per-class accuracy over classes with test samples), ``balanced_error`` (100 - that),
        ``worst_class`` (``{"index", "name", "accuracy"}``, lowest index on ties), ``harmonic_mean`` of the
        non-empty splits (``harmonic_mean_splits`` lists which; 0 when one of them is 0), ``thresholds``,
        ``split_classes`` (classes per split), ``classes_without_test``, ``ece`` (expected calibration error, %,
        :func:`expected_calibration_error` over the first ``len(train_counts)`` logit columns; None when
        ``predictions`` are class indices), ``ece_bins`` and ``per_class`` rows
        (``index, name, train_count, shot, n_test, correct, accuracy``).

    Raises:
        DataError: mismatched lengths, labels or predictions out of range, wrong number of class names.
    """
    counts = check_counts(train_counts, "train_counts")
    if len(class_names) != len(counts):
        raise DataError(
            f"class_names: {len(class_names)} names but {len(counts)} training counts; both must list the same classes"
        )
    m = _compute(predictions, labels, train_counts, many=many, few=few, num_outputs=num_outputs)
    acc, n_test, groups = m["acc"], m["n_test"], m["groups"]
    has_test = n_test > 0
    per_class = [
        {
            "index": i,
            "name": str(class_names[i]),
            "train_count": int(counts[i]),
            "shot": str(groups[i]),
            "n_test": int(n_test[i]),
            "correct": int(m["correct"][i]),
            "accuracy": None if not has_test[i] else float(acc[i]),
        }
        for i in range(len(counts))
    ]
    balanced = _mean_or_none(acc[has_test])
    worst = None
    if has_test.any():
        idx = int(np.flatnonzero(has_test)[np.argmin(acc[has_test])])
        worst = {"index": idx, "name": str(class_names[idx]), "accuracy": float(acc[idx])}
    present = [s for s in SPLITS if m[s] is not None]
    n_wrong_outputs = int((m["pred"] >= len(counts)).sum())
    metrics: dict[str, Any] = {
        "schema": SCHEMA,
        "overall": m["overall"],
        "many": m["many"],
        "medium": m["medium"],
        "few": m["few"],
        "balanced_accuracy": balanced,
        "balanced_error": None if balanced is None else 100.0 - balanced,
        "worst_class": worst,
        "harmonic_mean": _harmonic([m[s] for s in present]),
        "harmonic_mean_splits": present,
        "n_test": len(m["y"]),
        "num_classes": len(counts),
        "num_outputs": int(num_outputs or len(counts)),
        "predictions_outside_classes": n_wrong_outputs,
        "thresholds": {"many": int(many), "few": int(few)},
        "split_classes": {s: int((groups == s).sum()) for s in SPLITS},
        "split_test_samples": {s: int(n_test[groups == s].sum()) for s in SPLITS},
        "classes_without_test": [str(class_names[i]) for i in np.flatnonzero(~has_test)],
        "ece": (expected_calibration_error(predictions, m["y"], len(counts)) if np.ndim(predictions) == 2
                else None),
        "ece_bins": ECE_BINS,
        "per_class": per_class,
    }
    return metrics


def target_accuracy(logits: np.ndarray, labels: np.ndarray, num_target: int, train_counts: np.ndarray,
                    thresholds: tuple[int, int] = SHOT_THRESHOLDS) -> dict[str, float | None]:
    """Accuracy (%) of the target rows of a joint model's logits (auxiliary rows ``num_target..`` masked), overall
    and per shot group; a shot group without classes has accuracy ``None``.

    Args:
        logits: float [N, C >= num_target].
        labels: true target indices [N].
        num_target: L.
        train_counts: training images of the L targets (decide the shot groups).
        thresholds: ``(many, few)``.

    Returns:
        ``{"overall", "many", "medium", "few", "ece"}`` (``ece``: :func:`expected_calibration_error` of the target
        rows, %).
    """
    pred = logits[:, :num_target].argmax(1)
    out = {k: None if v is None else float(v) for k, v in shot_accuracy(pred, labels, train_counts, many=thresholds[0],
                                                                         few=thresholds[1]).items()}
    out["ece"] = expected_calibration_error(logits, labels, num_target)
    return out
