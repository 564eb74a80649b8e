"""Held-out evaluation sets: exhaustive pairs of unseen people, and re-cropped copies of images."""

import os

import numpy as np
import pytest

from mobilenet_embed.errors import UserError
from mobilenet_embed.pairs import exhaustive_pairs, read_pairs, write_pairs
from mobilenet_embed.robustness import RECROPS, Recrop, recrop_box, recrop_image


def _people(counts):
    return {f"p{i}": [f"p{i}/p{i}_{k + 1:04d}.jpg" for k in range(n)] for i, n in enumerate(counts)}


def _files(root, people):
    """Create `people`'s files (empty stand-ins) under `root`; their absolute paths."""
    for name, paths in people.items():
        (root / name).mkdir()
        for p in paths:
            (root / p).write_bytes(b"x")
    return {n: [str(root / p) for p in ps] for n, ps in people.items()}


def test_exhaustive_pairs_every_same_pair_under_the_cap_and_as_many_different():
    people = _people([2, 3, 4, 1, 1, 30])  # 1 + 3 + 6 + 0 + 0 + 435 same pairs possible
    pairs = exhaustive_pairs(people, max_same_per_identity=20, n_folds=10, seed=0)
    same = [p for p in pairs if p.issame]
    diff = [p for p in pairs if not p.issame]
    assert len(same) == len(diff) == 30  # 1 + 3 + 6 + 20 = 30, a multiple of 10
    keys = {(p.path_a, p.path_b) for p in same}
    for small in ("p0", "p1", "p2"):  # under the cap: every pair is there
        paths = people[small]
        for i in range(len(paths)):
            for j in range(i + 1, len(paths)):
                assert (paths[i], paths[j]) in keys
    assert sum(p.path_a.startswith("p5/") for p in same) == 20
    assert all(p.path_a.split("/")[0] == p.path_b.split("/")[0] for p in same)
    assert all(p.path_a.split("/")[0] != p.path_b.split("/")[0] for p in diff)
    assert len({(min(p.path_a, p.path_b), max(p.path_a, p.path_b)) for p in pairs}) == len(pairs)
    assert [p.fold for p in pairs] == [f for f in range(1, 11) for _ in range(6)]
    assert pairs == exhaustive_pairs(people, max_same_per_identity=20, n_folds=10, seed=0)
    assert pairs != exhaustive_pairs(people, max_same_per_identity=20, n_folds=10, seed=1)


def test_exhaustive_pairs_round_trip_through_a_pairs_file(tmp_path):
    absolute = _files(tmp_path, _people([3, 4, 5, 2, 2]))
    pairs = exhaustive_pairs(absolute, n_folds=2, seed=3)
    assert write_pairs(pairs, tmp_path / "pairs.txt", tmp_path, n_folds=2) == "lfw"
    back = read_pairs(str(tmp_path / "pairs.txt"), str(tmp_path))
    assert [(p.path_a, p.path_b, p.issame) for p in back] == [(p.path_a, p.path_b, p.issame) for p in pairs]


def test_exhaustive_pairs_refuses_too_few():
    with pytest.raises(UserError, match="fewer than the 10 folds"):
        exhaustive_pairs(_people([2, 2, 1]), n_folds=10)


def test_recrop_box_scales_and_shifts_around_the_centre():
    assert recrop_box(100, 100, Recrop("same", 1.0)) == (0, 0, 100, 100)
    assert recrop_box(100, 100, Recrop("tight", 0.5)) == (25, 25, 75, 75)
    assert recrop_box(100, 100, Recrop("loose", 1.5)) == (-25, -25, 125, 125)
    assert recrop_box(100, 100, Recrop("shift", 1.0, shift_x=0.1, shift_y=-0.2)) == (-20, 10, 80, 110)


def test_recrop_image_keeps_the_size_and_moves_the_content():
    image = np.zeros((40, 40, 3), np.uint8)
    image[18:22, 18:22] = 255  # a bright square at the centre
    assert np.array_equal(recrop_image(image, Recrop("same", 1.0)), image)
    for crop in RECROPS:
        out = recrop_image(image, crop)
        assert out.shape == image.shape and out.dtype == np.uint8
    tight = recrop_image(image, Recrop("tight", 0.5))  # zoom x2: the square doubles
    assert (tight[..., 0] > 127).sum() == pytest.approx(4 * 16, rel=0.3)
    loose = recrop_image(image, Recrop("loose", 2.0))  # zoom x0.5: a quarter of the area
    assert (loose[..., 0] > 60).sum() <= 8
    shifted = recrop_image(image, Recrop("shift", 1.0, shift_x=0.25))  # box moves right: content left
    ys, xs = np.nonzero(shifted[..., 0] > 127)
    assert xs.mean() == pytest.approx(20 - 10, abs=1)
    assert ys.mean() == pytest.approx(19.5, abs=1)


def test_read_pairs_needs_only_the_images_of_the_chosen_folds(tmp_path):
    """A copy of one fold's images (a re-cropped or aligned set) evaluates that fold of pairs.txt."""
    absolute = _files(tmp_path, _people([3, 3, 3, 3, 5, 2]))
    pairs = exhaustive_pairs(absolute, n_folds=2, seed=0)
    write_pairs(pairs, tmp_path / "pairs.txt", tmp_path, n_folds=2)
    used_by_fold2 = {path for p in pairs if p.fold == 2 for path in (p.path_a, p.path_b)}
    deleted = {path for p in pairs for path in (p.path_a, p.path_b)} - used_by_fold2
    assert deleted  # images only fold 1 needs
    for path in deleted:
        os.unlink(path)
    fold2 = read_pairs(str(tmp_path / "pairs.txt"), str(tmp_path), folds=[2])
    assert sorted((p.path_a, p.path_b) for p in fold2) == sorted((p.path_a, p.path_b) for p in pairs if p.fold == 2)
    with pytest.raises(UserError, match="image not found"):
        read_pairs(str(tmp_path / "pairs.txt"), str(tmp_path))
