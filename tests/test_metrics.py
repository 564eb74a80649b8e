"""LFW-protocol verification metrics (mobilenet_embed.metrics) and the ROC plot."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import interpolate
from scipy.optimize import brentq
from sklearn import metrics as skm
from sklearn.model_selection import KFold

from mobilenet_embed.errors import UserError
from mobilenet_embed.records import jsonable
from mobilenet_embed.metrics import (
    best_threshold_accuracy,
    equal_error_rate,
    fold_indices,
    threshold_at_far,
    threshold_grid,
    val_threshold_grid,
    verification_metrics,
)

REPO = Path(__file__).resolve().parents[1]


def blocks(n_folds, same_dist, diff_dist):
    """Folds of `len(same_dist)` same then `len(diff_dist)` different pairs, repeated."""
    d = np.concatenate([np.concatenate([same_dist, diff_dist])] * n_folds)
    s = np.concatenate([np.concatenate([np.ones(len(same_dist), bool), np.zeros(len(diff_dist), bool)])] * n_folds)
    return d, s


# --------------------------------------------------------------------------- grids and folds


def test_threshold_grids_are_facenets_for_squared_l2():
    assert np.array_equal(threshold_grid("squared-L2"), np.arange(0, 4, 0.01))
    assert np.array_equal(val_threshold_grid("squared-L2"), np.arange(0, 4, 0.001))
    assert np.array_equal(threshold_grid("squared-L2", 0.05), np.arange(0, 4, 0.05))
    for name, upper in (("L2", 2.0), ("cosine", 2.0), ("angular", 1.0)):
        grid = threshold_grid(name)
        assert len(grid) == 400 and grid[0] == 0 and upper - 0.01 < grid[-1] < upper
        assert len(val_threshold_grid(name)) == 4000
    with pytest.raises(UserError, match="unknown distance 'euclid'"):
        threshold_grid("euclid")


def test_fold_layout_is_kfold_without_shuffle_in_file_order():
    folds = fold_indices(6000, 10)
    assert len(folds) == 10
    for k, (train, test) in enumerate(folds):
        assert np.array_equal(test, np.arange(600 * k, 600 * (k + 1)))
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(6000))
    # uneven: the first n % k folds hold one pair more
    sizes = [len(test) for _, test in fold_indices(25, 10)]
    assert sizes == [3] * 5 + [2] * 5
    with pytest.raises(UserError, match="5 pairs cannot be split into 10 folds"):
        fold_indices(5, 10)
    with pytest.raises(UserError, match="at least 2 folds"):
        verification_metrics([0.1, 0.2], [True, False], n_folds=1)


# --------------------------------------------------------------------------- hand-computable cases


def lfw_layout(n_folds, per_fold):
    """issame of LFW's View 2 layout: per fold `per_fold` same then `per_fold` different pairs."""
    return np.tile(np.repeat([True, False], per_fold), n_folds)


def test_perfectly_separable_distances():
    rng = np.random.default_rng(1)
    s = lfw_layout(10, 30)
    d = np.where(s, rng.uniform(0.1, 0.9, 600), rng.uniform(1.1, 3.0, 600))
    d[::60] = 0.9  # every fold's largest same distance, so the folds agree on the best threshold
    m = verification_metrics(d, s)
    assert m["accuracy"] == 1.0 and m["accuracy_std"] == 0.0
    assert m["fold_accuracies"] == [1.0] * 10
    assert m["eer"] == 0.0
    assert m["auc"] == pytest.approx(1.0)
    # each fold's best threshold: the first grid value past the training folds' largest same distance
    grid = np.arange(0, 4, 0.01)
    expected = [grid[np.argmax(grid > d[train][s[train]].max())] for train, _ in fold_indices(600, 10)]
    assert m["fold_thresholds"] == expected
    assert m["threshold"] == pytest.approx(np.mean(expected))
    # VAL@1e-3: FAR 0 keeps its smallest threshold (0), so the interpolated threshold lies
    # 1e-3 / (1/270) of the way to the first grid value past a different pair (~1.1): ~0.3
    assert m["far"] == 0.0 and 0.1 < m["val"] < 0.5
    assert (m["n_pairs"], m["n_same"], m["n_diff"], m["n_folds"]) == (600, 300, 300, 10)


def test_reversed_distances():
    rng = np.random.default_rng(2)
    d, s = blocks(10, rng.uniform(2.1, 3.0, 30), rng.uniform(0.1, 0.9, 30))
    m = verification_metrics(d, s)
    # no threshold beats predicting "different" everywhere (the first of the tied thresholds: 0)
    assert m["accuracy"] == 0.5 and m["threshold"] == 0.0
    assert m["auc"] == pytest.approx(0.0)
    assert m["eer"] == pytest.approx(1.0)
    assert m["val"] == 0.0


def test_all_distances_tied():
    d, s = blocks(10, np.full(5, 1.0), np.full(5, 1.0))
    m = verification_metrics(d, s)
    assert m["accuracy"] == 0.5 and m["threshold"] == 0.0
    assert m["auc"] == pytest.approx(0.5)
    assert m["eer"] == pytest.approx(0.5)


def test_same_is_predicted_strictly_below_the_threshold():
    assert best_threshold_accuracy([0.5, 0.7], [True, False], thresholds=[0.5, 0.6]) == (1.0, 0.6)
    # ties between thresholds: the first (smallest) wins
    assert best_threshold_accuracy([0.5, 0.7], [True, False], thresholds=[0.55, 0.6]) == (1.0, 0.55)


# two folds of 4 pairs whose numbers are worked out by hand in the comments
HAND_DIST = [0.2, 0.6, 0.6, 1.0, 0.3, 0.5, 0.4, 0.9]
HAND_SAME = [True, True, False, False, True, True, False, False]
HAND_GRID = [0.0, 0.25, 0.45, 0.55, 0.65, 0.95, 1.05]


def test_hand_computed_accuracy_and_roc():
    m = verification_metrics(HAND_DIST, HAND_SAME, n_folds=2, thresholds=HAND_GRID, val_thresholds=HAND_GRID)
    # fold 1 tested, trained on fold 2 (same .3 .5, diff .4 .9): best 0.55 (acc .75);
    #   fold 1 at 0.55: same .2 yes .6 no, diff .6 1.0 no -> 3/4
    # fold 2 tested, trained on fold 1 (same .2 .6, diff .6 1.0): .25 .. .95 tie at .75, first 0.25;
    #   fold 2 at 0.25: same .3 .5 no, diff .4 .9 no -> 2/4
    assert m["fold_thresholds"] == [0.55, 0.25]
    assert m["fold_accuracies"] == [0.75, 0.5]
    assert m["accuracy"] == 0.625 and m["accuracy_std"] == 0.125
    assert m["threshold"] == pytest.approx(0.4)
    # per-fold test rates averaged
    assert np.allclose(m["tpr"], [0, 0.25, 0.5, 0.75, 1, 1, 1])
    assert np.allclose(m["fpr"], [0, 0, 0.25, 0.25, 0.5, 0.75, 1])
    assert np.array_equal(m["thresholds"], HAND_GRID)
    # trapezoids: .25*.375 + .25*.875 + .25 + .25
    assert m["auc"] == pytest.approx(0.8125)
    # 1 - x - tpr(x) drops from .25 to 0 at x = .25 (the vertical ROC segment at FAR .25)
    assert m["eer"] == pytest.approx(0.25, abs=1e-9)


def test_hand_computed_val_at_far():
    # FAR on the training fold over HAND_GRID:
    #   fold 1 trains on diff (.4, .9): 0 0 .5 .5 .5 1 1 -> distinct: 0@0, .5@.45, 1@.95
    #   fold 2 trains on diff (.6, 1.0): 0 0 0 0 .5 .5 1 -> distinct: 0@0, .5@.65, 1@1.05
    m = verification_metrics(HAND_DIST, HAND_SAME, n_folds=2, far_target=0.5,
                             thresholds=HAND_GRID, val_thresholds=HAND_GRID)
    assert m["fold_val_thresholds"] == pytest.approx([0.45, 0.65])
    # fold 1 at .45: same .2 yes .6 no -> VAL .5; diff .6 1.0 no -> FAR 0
    # fold 2 at .65: same .3 .5 -> VAL 1;        diff .4 yes .9 no -> FAR .5
    assert m["fold_vals"] == [0.5, 1.0] and m["fold_fars"] == [0.0, 0.5]
    assert (m["val"], m["val_std"], m["far"]) == (0.75, 0.25, 0.25)

    # interpolation between FAR 0 (its SMALLEST threshold, 0) and FAR .5
    m = verification_metrics(HAND_DIST, HAND_SAME, n_folds=2, far_target=0.25,
                             thresholds=HAND_GRID, val_thresholds=HAND_GRID)
    assert m["fold_val_thresholds"] == pytest.approx([0.225, 0.325])
    # fold 2 at .325: same .3 yes .5 no (keeping FAR 0's largest threshold, .55, would give .6 and VAL 1)
    assert m["fold_vals"] == [0.5, 0.5] and m["fold_fars"] == [0.0, 0.0]

    # never reached on the training folds: threshold 0, VAL 0
    m = verification_metrics(HAND_DIST, HAND_SAME, n_folds=2, far_target=0.75,
                             thresholds=HAND_GRID, val_thresholds=HAND_GRID[:3])
    assert m["fold_val_thresholds"] == [0.0, 0.0]
    assert (m["val"], m["far"]) == (0.0, 0.0)


def test_threshold_at_far_helper():
    grid = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert threshold_at_far([0, 0, 0.2, 0.2, 0.6], grid, 0.1) == pytest.approx(1.0)  # (0@0)-(0.2@2)
    assert threshold_at_far([0, 0, 0.2, 0.2, 0.6], grid, 0.2) == 2.0
    assert threshold_at_far([0, 0, 0.2, 0.2, 0.6], grid, 0.4) == pytest.approx(3.0)  # (0.2@2)-(0.6@4)
    assert threshold_at_far([0, 0, 0.2, 0.2, 0.6], grid, 0.7) == 0.0


def test_division_by_zero_gives_zero_like_facenet():
    # fold 1 holds only same pairs, fold 2 only different ones
    d = np.array([0.1, 0.2, 0.3, 0.4, 1.5, 1.6, 1.7, 1.8])
    s = np.array([True] * 4 + [False] * 4)
    m = verification_metrics(d, s, n_folds=2)
    ref = facenet_reference(d, s, n_folds=2)
    assert np.array_equal(m["tpr"], ref["tpr"]) and np.array_equal(m["fpr"], ref["fpr"])
    assert m["fold_accuracies"] == list(ref["accuracy"])
    assert m["fold_vals"] == [0.0, 0.0] and m["fold_fars"] == [0.0, 0.0]
    # FaceNet's interp1d fails here (max FPR .5); TPR is held past the curve's end instead
    assert ref["eer"] is None and m["eer"] == pytest.approx(0.5)


def test_input_errors():
    with pytest.raises(UserError, match="1 of 3 pair distances are not finite"):
        verification_metrics([0.1, np.nan, 0.3], [True, False, True], n_folds=2)
    with pytest.raises(ValueError, match="same length"):
        verification_metrics([0.1, 0.2], [True], n_folds=2)
    with pytest.raises(ValueError, match="strictly increasing"):
        verification_metrics([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], n_folds=2, thresholds=[0.5, 0.1])
    with pytest.raises(UserError, match="far_target"):
        verification_metrics([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], n_folds=2, far_target=2.0)


# --------------------------------------------------------------------------- FaceNet regression


def facenet_reference(dist, actual_issame, n_folds=10, far_target=1e-3):
    """FaceNet's lfw.evaluate + validate_on_lfw (calculate_roc / calculate_val loops), for
    precomputed distances; 0 for FaceNet's division by zero; repeated FAR values deduplicated
    (smallest threshold kept) as current SciPy requires."""

    def calculate_accuracy(threshold, dist, actual_issame):
        predict_issame = np.less(dist, threshold)
        tp = np.sum(np.logical_and(predict_issame, actual_issame))
        fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
        tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
        fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
        tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
        fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
        acc = float(tp + tn) / dist.size
        return tpr, fpr, acc

    def calculate_val_far(threshold, dist, actual_issame):
        predict_issame = np.less(dist, threshold)
        true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
        false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
        n_same = np.sum(actual_issame)
        n_diff = np.sum(np.logical_not(actual_issame))
        val = 0.0 if n_same == 0 else float(true_accept) / float(n_same)
        far = 0.0 if n_diff == 0 else float(false_accept) / float(n_diff)
        return val, far

    k_fold = KFold(n_splits=n_folds, shuffle=False)
    indices = np.arange(len(dist))

    thresholds = np.arange(0, 4, 0.01)
    tprs = np.zeros((n_folds, len(thresholds)))
    fprs = np.zeros((n_folds, len(thresholds)))
    accuracy = np.zeros(n_folds)
    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        for threshold_idx, threshold in enumerate(thresholds):
            tprs[fold_idx, threshold_idx], fprs[fold_idx, threshold_idx], _ = calculate_accuracy(
                threshold, dist[test_set], actual_issame[test_set])
        _, _, accuracy[fold_idx] = calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set])
    tpr = np.mean(tprs, 0)
    fpr = np.mean(fprs, 0)

    thresholds = np.arange(0, 4, 0.001)
    val = np.zeros(n_folds)
    far = np.zeros(n_folds)
    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        far_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, far_train[threshold_idx] = calculate_val_far(threshold, dist[train_set], actual_issame[train_set])
        if np.max(far_train) >= far_target:
            xs, ys = [], []
            for f, t in zip(far_train, thresholds):
                if not xs or f != xs[-1]:
                    xs.append(f)
                    ys.append(t)
            f = interpolate.interp1d(xs, ys, kind="slinear")
            threshold = f(far_target)
        else:
            threshold = 0.0
        val[fold_idx], far[fold_idx] = calculate_val_far(threshold, dist[test_set], actual_issame[test_set])

    auc = skm.auc(fpr, tpr)
    try:
        eer = brentq(lambda x: 1. - x - interpolate.interp1d(fpr, tpr)(x), 0., 1.)
    except ValueError:  # FaceNet fails where the ROC stops short of FPR 1
        eer = None
    return {"tpr": tpr, "fpr": fpr, "accuracy": accuracy, "val": np.mean(val), "val_std": np.std(val),
            "far": np.mean(far), "auc": auc, "eer": eer}


def test_matches_facenet_reference_on_6000_random_pairs():
    rng = np.random.default_rng(7)
    same = np.zeros(6000, bool)
    for k in range(10):  # LFW layout: per fold 300 same then 300 different
        same[600 * k:600 * k + 300] = True
    dist = np.where(same, rng.normal(0.9, 0.35, 6000), rng.normal(1.7, 0.35, 6000))
    dist = np.round(np.clip(dist, 0.0, 3.9), 3)  # many ties, some exactly on grid values
    m = verification_metrics(dist, same)
    ref = facenet_reference(dist, same)
    assert np.array_equal(m["tpr"], ref["tpr"])
    assert np.array_equal(m["fpr"], ref["fpr"])
    assert m["fold_accuracies"] == list(ref["accuracy"])
    assert m["accuracy"] == np.mean(ref["accuracy"]) and m["accuracy_std"] == np.std(ref["accuracy"])
    assert m["val"] == ref["val"] and m["val_std"] == ref["val_std"] and m["far"] == ref["far"]
    assert m["auc"] == ref["auc"]
    assert m["eer"] == pytest.approx(ref["eer"], abs=1e-12)
    assert 0.8 < m["accuracy"] < 0.99 and 0 < m["val"] < 1 and 0 < m["far"] < 0.01


def test_eer_equals_interp1d_version_on_a_staircase():
    fpr = np.array([0, 0, 0.1, 0.1, 0.3, 0.3, 0.6, 1.0, 1.0])
    tpr = np.array([0, 0.2, 0.2, 0.5, 0.5, 0.8, 0.9, 0.9, 1.0])
    ref = brentq(lambda x: 1. - x - interpolate.interp1d(fpr, tpr)(x), 0., 1.)
    assert equal_error_rate(fpr, tpr) == ref


# --------------------------------------------------------------------------- output helpers


def test_jsonable_and_keys():
    d, s = blocks(4, np.array([0.5, 0.6]), np.array([1.5, 0.55]))
    m = verification_metrics(d, s, n_folds=4, distance="cosine")
    for key in ("accuracy", "accuracy_std", "threshold", "val", "val_std", "far", "auc", "eer"):
        assert type(m[key]) is float
    assert len(m["fold_accuracies"]) == 4 and len(m["fold_thresholds"]) == 4
    assert isinstance(m["tpr"], np.ndarray) and len(m["tpr"]) == len(m["fpr"]) == len(m["thresholds"]) == 400
    assert m["thresholds"][-1] < 2.0 and m["distance"] == "cosine"
    text = json.dumps(jsonable(m), allow_nan=False)
    back = json.loads(text)
    assert back["tpr"] == m["tpr"].tolist() and back["accuracy"] == m["accuracy"]


def test_plot_roc_writes_a_png(tmp_path):
    from mobilenet_embed.plots import plot_roc, plot_roc_from_metrics

    rng = np.random.default_rng(3)
    d, s = blocks(10, rng.normal(0.8, 0.3, 30).clip(0, 3), rng.normal(1.6, 0.3, 30).clip(0, 3))
    m = verification_metrics(d, s)
    out = plot_roc_from_metrics(m, tmp_path / "roc.png", title="test")
    data = (tmp_path / "roc.png").read_bytes()
    assert out == str(tmp_path / "roc.png") and data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "roc.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    # FAR 0 everywhere (perfect curve) and at the operating point: clipped onto the log axis
    plot_roc([0.0, 0.0, 1.0], [0.0, 1.0, 1.0], tmp_path / "sub" / "perfect.png", operating_point=(0.0, 1.0))
    assert (tmp_path / "sub" / "perfect.png").read_bytes()[:4] == b"\x89PNG"


def test_modules_do_not_import_tensorflow_or_matplotlib():
    code = (
        "import sys, mobilenet_embed.metrics, mobilenet_embed.pairs, mobilenet_embed.plots\n"
        "bad = [m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_val_at_far_is_marked_undefined_with_too_few_different_pairs():
    from mobilenet_embed.metrics import val_pairs_needed, val_text

    rng = np.random.default_rng(0)
    d, s = blocks(2, rng.normal(0.8, 0.3, 10).clip(0, 3), rng.normal(1.6, 0.3, 10).clip(0, 3))
    few = verification_metrics(d, s, n_folds=2, far_target=1e-3)  # 20 pairs, 5 different per train fold
    assert val_pairs_needed(1e-3) == 1000 and val_pairs_needed(0.1) == 10
    assert few["val_defined"] is False and few["val_different_pairs_needed"] == 1000
    assert val_text(few) == "VAL@FAR=0.001 n/a (needs >= 1,000 different pairs)"
    json.loads(json.dumps(jsonable(few)))  # metrics.json stays valid
    enough = verification_metrics(d, s, n_folds=2, far_target=0.2)  # 5 different pairs: FAR 1/5 measurable
    assert enough["val_defined"] is True
    assert val_text(enough) == f"VAL {enough['val']:.4f} @ FAR {enough['far']:.4f}"


@pytest.mark.parametrize("title", ["ROC runs/" + "a_very_long_run_name_" * 8 + " (fold 10)",
                                   "ROC " + " ".join(["word"] * 60)])
def test_roc_title_of_a_long_run_name_fits_the_figure(tmp_path, title, monkeypatch):
    import matplotlib.figure

    from mobilenet_embed.plots import plot_roc

    saved = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        saved.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    plot_roc([0.0, 0.1, 1.0], [0.0, 0.8, 1.0], tmp_path / "roc.png", title=title)
    fig = saved[0]
    shown = fig.axes[0].title
    box = shown.get_window_extent(fig.canvas.get_renderer())  # before the fix: x0 -547 px, cut off
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    assert shown.get_text().startswith(title[:8]) and len(shown.get_text().splitlines()) <= 3
