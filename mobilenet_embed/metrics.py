"""Face-verification metrics by the LFW protocol, as FaceNet computes them.

Pure NumPy + scikit-learn + SciPy: no TensorFlow, so `mbembed eval` can score
saved distances without loading a model.

The protocol is the one of FaceNet's `src/lfw.py` (`evaluate`) and `src/facenet.py`
(`calculate_roc`, `calculate_accuracy`, `calculate_val`, `calculate_val_far`),
reproduced number for number:

* folds: `KFold(n_folds, shuffle=False)` over the pairs in file order (LFW View 2:
  10 folds of 600 pairs);
* a pair is predicted *same* where ``distance < threshold``;
* accuracy: in each fold, the threshold of the grid with the best accuracy on the
  other folds (the first one on ties, `np.argmax`) is applied to the fold; mean and
  (population) std over the folds;
* ROC: TPR and FPR of the test fold for every threshold of the grid, averaged over
  the folds; ``auc = sklearn.metrics.auc(fpr, tpr)``; ``eer`` is the root in [0, 1]
  of ``1 - x - interp(fpr, tpr)(x)`` (brentq);
* VAL@FAR: in each fold, the threshold at which the other folds' FAR reaches
  `far_target`, linearly interpolated over a 10x finer grid (0 when that FAR is
  never reached); then VAL and FAR of the fold at that threshold; means (and VAL's
  std) over the folds.

Where FaceNet's formulas divide by zero (a fold without same or without different
pairs), the rate is 0.

Differences from FaceNet, all in cases where FaceNet fails rather than returns a number:

* VAL@FAR: current SciPy refuses repeated x values in ``interp1d(kind='slinear')``;
  the interpolation runs over the distinct FAR values, keeping for each the
  smallest threshold (FAR never decreases with the threshold).
* EER: FaceNet's ``interp1d(fpr, tpr)`` raises when the grid ends before every
  different pair is accepted (max FPR < 1); here TPR is held at its last value
  beyond the curve's end (``np.interp``; identical to interp1d inside its range).

Distances and threshold grids (`threshold_grid`): the grid spans the distance's
range for unit-length embeddings with 400 steps for accuracy/ROC and 4000 steps for
VAL@FAR, which for squared L2 is exactly FaceNet's ``np.arange(0, 4, 0.01)`` and
``np.arange(0, 4, 0.001)``:

=============  ============================  =========  =========  ==========
name           distance                      range      ROC step   VAL step
=============  ============================  =========  =========  ==========
``squared-L2`` ``||a - b||^2``               [0, 4]     0.01       0.001
``L2``         ``||a - b||``                 [0, 2]     0.005      0.0005
``cosine``     ``1 - cos(a, b)``             [0, 2]     0.005      0.0005
``angular``    ``arccos(cos(a, b)) / pi``    [0, 1]     0.0025     0.00025
=============  ============================  =========  =========  ==========

(for unit vectors ``cosine`` is ``squared-L2 / 2``, so both give the same accuracy
on the same embeddings, up to the grid.)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np

from mobilenet_embed.errors import UserError

#: distance name -> upper end of its range for unit-length embeddings
DISTANCE_RANGES = {
    "squared-L2": 4.0,
    "L2": 2.0,
    "cosine": 2.0,
    "angular": 1.0,
}
#: number of grid steps over the range: accuracy/ROC grid, VAL@FAR grid (FaceNet: 400, 4000)
ROC_STEPS = 400
VAL_STEPS = 4000

#: keys of `verification_metrics`' dict that hold NumPy arrays (ROC curve)
ARRAY_KEYS = ("tpr", "fpr", "thresholds")


# --------------------------------------------------------------------------- grids, folds


def _check_distance(distance: str) -> float:
    try:
        return DISTANCE_RANGES[distance]
    except KeyError:
        raise UserError(
            f"unknown distance '{distance}'; expected one of {', '.join(DISTANCE_RANGES)}"
        ) from None


def threshold_grid(distance: str = "squared-L2", step: Optional[float] = None) -> np.ndarray:
    """``np.arange(0, upper, step)`` over the range of `distance` (see the module doc).

    `step` None gives the accuracy/ROC grid (range / 400: 0.01 for squared-L2);
    ``val_threshold_grid`` gives the finer VAL@FAR grid.
    """
    upper = _check_distance(distance)
    if step is None:
        step = upper / ROC_STEPS
    if not step > 0:
        raise ValueError(f"threshold step must be positive, received {step}")
    return np.arange(0, upper, step)


def val_threshold_grid(distance: str = "squared-L2") -> np.ndarray:
    """The VAL@FAR grid: range / 4000 steps (FaceNet's ``np.arange(0, 4, 0.001)`` for squared-L2)."""
    upper = _check_distance(distance)
    return np.arange(0, upper, upper / VAL_STEPS)


def fold_indices(n_pairs: int, n_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of ``KFold(n_folds, shuffle=False)`` over `n_pairs` pairs.

    Test folds are consecutive blocks in file order; the first ``n_pairs % n_folds``
    folds hold one pair more than the others.
    """
    from sklearn.model_selection import KFold

    if n_folds < 2:
        raise UserError(f"cross-validation needs at least 2 folds, received {n_folds}")
    if n_pairs < n_folds:
        raise UserError(f"{n_pairs} pairs cannot be split into {n_folds} folds")
    return list(KFold(n_splits=n_folds, shuffle=False).split(np.arange(n_pairs)))


# --------------------------------------------------------------------------- counting


def _as_inputs(distances, issame) -> tuple[np.ndarray, np.ndarray]:
    dist = np.asarray(distances, dtype=np.float64)
    same = np.asarray(issame)
    if dist.ndim != 1 or same.ndim != 1 or len(dist) != len(same):
        raise ValueError(
            f"distances and issame must be 1-D of the same length, received shapes "
            f"{dist.shape} and {same.shape}"
        )
    if same.dtype != bool:
        if not np.all(np.isin(same, (0, 1))):
            raise ValueError("issame must hold booleans (or 0/1)")
        same = same.astype(bool)
    bad = int(np.count_nonzero(~np.isfinite(dist)))
    if bad:
        raise UserError(f"{bad} of {len(dist)} pair distances are not finite (NaN or inf)")
    if len(dist) == 0:
        raise UserError("no pairs to evaluate")
    return dist, same


def _as_grid(thresholds, name: str) -> np.ndarray:
    grid = np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or len(grid) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array")
    if len(grid) > 1 and not np.all(np.diff(grid) > 0):
        raise ValueError(f"{name} must be strictly increasing")
    return grid


def _rates(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray):
    """TPR, FPR and accuracy of every threshold, as FaceNet's `calculate_accuracy`.

    Counts are exact (`searchsorted` on the sorted distances counts ``d < t``), and
    the divisions are FaceNet's, so the floats are identical to its loop's.
    """
    d_same = np.sort(dist[same])
    d_diff = np.sort(dist[~same])
    tp = np.searchsorted(d_same, thresholds, side="left")  # same pairs with d < t
    fp = np.searchsorted(d_diff, thresholds, side="left")  # different pairs with d < t
    fn = len(d_same) - tp
    tn = len(d_diff) - fp
    tpr = tp / len(d_same) if len(d_same) else np.zeros(len(thresholds))
    fpr = fp / len(d_diff) if len(d_diff) else np.zeros(len(thresholds))
    acc = (tp + tn) / dist.size
    return tpr, fpr, acc


def _val_far(dist: np.ndarray, same: np.ndarray, threshold: float) -> tuple[float, float]:
    """FaceNet's `calculate_val_far` (0 instead of a division by zero)."""
    accept = dist < threshold
    n_same = int(np.count_nonzero(same))
    n_diff = int(same.size - n_same)
    true_accept = int(np.count_nonzero(accept & same))
    false_accept = int(np.count_nonzero(accept & ~same))
    val = float(true_accept) / float(n_same) if n_same else 0.0
    far = float(false_accept) / float(n_diff) if n_diff else 0.0
    return val, far


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """The threshold where the FAR curve `far` (over increasing `thresholds`) reaches `far_target`.

    Linear interpolation (FaceNet: ``interp1d(far, thresholds, kind='slinear')``) over the
    distinct FAR values, keeping for each the smallest threshold; 0 when `far` never
    reaches `far_target` (FaceNet's rule).
    """
    far = np.asarray(far, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if far.size == 0 or np.max(far) < far_target:
        return 0.0
    far_values, first = np.unique(far, return_index=True)
    return float(np.interp(far_target, far_values, thresholds[first]))


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The root in [0, 1] of ``1 - x - tpr(x)``, `tpr(x)` interpolated linearly on the ROC.

    `fpr` must be non-decreasing (ROC arrays in threshold order). Equal to FaceNet's
    ``brentq(lambda x: 1. - x - interp1d(fpr, tpr)(x), 0., 1.)`` wherever that one
    returns (interp1d sorts stably and calls np.interp).
    """
    from scipy.optimize import brentq

    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    return float(brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0))


# --------------------------------------------------------------------------- public metrics


def best_threshold_accuracy(
    distances: Iterable[float],
    issame: Iterable[bool],
    thresholds: Optional[np.ndarray] = None,
    distance: str = "squared-L2",
) -> tuple[float, float]:
    """(accuracy, threshold) of the best grid threshold on all the pairs, without folds.

    An optimistic number for quick validation during training; the first (smallest)
    threshold wins ties.
    """
    dist, same = _as_inputs(distances, issame)
    grid = _as_grid(threshold_grid(distance) if thresholds is None else thresholds, "thresholds")
    _, _, acc = _rates(dist, same, grid)
    best = int(np.argmax(acc))
    return float(acc[best]), float(grid[best])


def _per_fold(dist: np.ndarray, same: np.ndarray, folds: list, grid: np.ndarray, val_grid: np.ndarray,
              far_target: float) -> tuple[np.ndarray, ...]:
    """Per test fold: its ROC (tpr, fpr over `grid`), accuracy at the threshold best on the other
    folds and that threshold, VAL and FAR at the threshold where the other folds' FAR reaches
    `far_target` and that threshold."""
    n_folds = len(folds)
    tprs = np.zeros((n_folds, len(grid)))
    fprs = np.zeros((n_folds, len(grid)))
    accuracy = np.zeros(n_folds)
    best_thresholds = np.zeros(n_folds)
    val = np.zeros(n_folds)
    far = np.zeros(n_folds)
    val_thresholds_used = np.zeros(n_folds)

    for k, (train, test) in enumerate(folds):
        # calculate_roc: best threshold on the other folds, rates of this fold
        _, _, acc_train = _rates(dist[train], same[train], grid)
        best = int(np.argmax(acc_train))
        tprs[k], fprs[k], acc_test = _rates(dist[test], same[test], grid)
        accuracy[k] = acc_test[best]
        best_thresholds[k] = grid[best]

        # calculate_val: threshold where the other folds' FAR reaches the target
        _, far_train, _ = _rates(dist[train], same[train], val_grid)
        threshold = threshold_at_far(far_train, val_grid, far_target)
        val_thresholds_used[k] = threshold
        val[k], far[k] = _val_far(dist[test], same[test], threshold)
    return tprs, fprs, accuracy, best_thresholds, val, far, val_thresholds_used


def val_pairs_needed(far_target: float) -> int:
    """Different pairs the threshold-choosing folds need for a FAR of `far_target` to be
    measurable at all: one false accept among N different pairs is a FAR of 1/N."""
    return int(math.ceil(1.0 / far_target - 1e-9)) if far_target > 0 else 0


def val_text(metrics: dict) -> str:
    """``VAL 0.9800 @ FAR 0.0010``, or ``VAL@FAR=0.001 n/a (needs >= 1000 different pairs)`` when
    the threshold-choosing folds hold too few different pairs for that FAR (then the numbers
    in `metrics` are those of the coarsest FAR the pairs allow, not of the target)."""
    if metrics.get("val_defined", True):
        return f"VAL {metrics['val']:.4f} @ FAR {metrics['far']:.4f}"
    return (f"VAL@FAR={metrics['far_target']:g} n/a (needs >= {int(metrics['val_different_pairs_needed']):,} "
            "different pairs)")


def verification_metrics(
    distances: Iterable[float],
    issame: Iterable[bool],
    n_folds: int = 10,
    far_target: float = 1e-3,
    thresholds: Optional[np.ndarray] = None,
    distance: str = "squared-L2",
    val_thresholds: Optional[np.ndarray] = None,
) -> dict[str, Any]:
    """LFW-protocol verification metrics of pair `distances` (see the module doc).

    `distances[i]` is the distance of pair i, `issame[i]` whether it shows one person;
    pairs in file order (the folds are consecutive blocks). `thresholds` (default
    ``threshold_grid(distance)``) is the accuracy/ROC grid, `val_thresholds` (default
    ``val_threshold_grid(distance)``) the VAL@FAR grid; both strictly increasing.

    Returns a dict:

    * ``accuracy``, ``accuracy_std``: mean and std over folds of the test-fold accuracy;
    * ``threshold``, ``threshold_std``: mean and std of the folds' best thresholds;
    * ``fold_accuracies``, ``fold_thresholds``: per fold (lists of float);
    * ``val``, ``val_std``, ``far``: VAL@FAR means (VAL's std); ``far_target``;
    * ``fold_vals``, ``fold_fars``, ``fold_val_thresholds``: per fold;
    * ``val_defined``: whether every fold's threshold-choosing folds hold at least
      ``val_different_pairs_needed`` (= ceil(1 / far_target)) different pairs; when not, VAL and
      FAR are what the pairs allow, not VAL at the target (`val_text` says "n/a");
    * ``auc``, ``eer``;
    * ``tpr``, ``fpr``, ``thresholds``: the ROC, NumPy arrays over the accuracy grid;
    * ``distance``, ``n_folds``, ``n_pairs``, ``n_same``, ``n_diff``.

    Scalars are Python floats/ints; `mobilenet_embed.records.jsonable` turns the arrays into lists.
    """
    from sklearn.metrics import auc as sk_auc

    dist, same = _as_inputs(distances, issame)
    if not 0.0 <= far_target <= 1.0:
        raise UserError(f"far_target must lie in [0, 1], received {far_target}")
    grid = _as_grid(threshold_grid(distance) if thresholds is None else thresholds, "thresholds")
    val_grid = _as_grid(
        val_threshold_grid(distance) if val_thresholds is None else val_thresholds, "val_thresholds"
    )
    folds = fold_indices(len(dist), n_folds)
    tprs, fprs, accuracy, best_thresholds, val, far, val_thresholds_used = _per_fold(
        dist, same, folds, grid, val_grid, far_target)
    train_diff = [int(np.count_nonzero(~same[train])) for train, _ in folds]

    tpr = np.mean(tprs, 0)
    fpr = np.mean(fprs, 0)
    n_same = int(np.count_nonzero(same))
    return {
        "distance": distance,
        "n_folds": int(n_folds),
        "n_pairs": int(len(dist)),
        "n_same": n_same,
        "n_diff": int(len(dist) - n_same),
        "accuracy": float(np.mean(accuracy)),
        "accuracy_std": float(np.std(accuracy)),
        "threshold": float(np.mean(best_thresholds)),
        "threshold_std": float(np.std(best_thresholds)),
        "fold_accuracies": [float(a) for a in accuracy],
        "fold_thresholds": [float(t) for t in best_thresholds],
        "far_target": float(far_target),
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
        "fold_vals": [float(v) for v in val],
        "fold_fars": [float(f) for f in far],
        "fold_val_thresholds": [float(t) for t in val_thresholds_used],
        "val_different_pairs_needed": val_pairs_needed(far_target),
        "val_defined": bool(min(train_diff) >= val_pairs_needed(far_target)),
        "auc": float(sk_auc(fpr, tpr)),
        "eer": equal_error_rate(fpr, tpr),
        "tpr": tpr,
        "fpr": fpr,
        "thresholds": grid,
    }
