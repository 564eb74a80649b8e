"""Pairs files (LFW View 1 / View 2, mbembed v1), make_pairs, write_pairs, pair_distances.csv."""

import csv
import os

import numpy as np
import pytest

from mobilenet_embed.errors import UserError
from mobilenet_embed.metrics import fold_indices
from mobilenet_embed.pairs import (
    MBEMBED_HEADER,
    Pair,
    identity_folders,
    make_pairs,
    read_pairs,
    write_pair_distances_csv,
    write_pairs,
)

MALFORMED = "expected 'name n1 n2' or 'name1 n1 name2 n2', received"


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff")  # a few bytes; only existence matters here


@pytest.fixture
def lfw(tmp_path):
    """A tiny LFW-style tree: <root>/<name>/<name>_NNNN.jpg (one .png)."""
    root = tmp_path / "images"
    for name, count in (("Ann_A", 3), ("Bob_B", 2), ("Cid_C", 1)):
        for n in range(1, count + 1):
            touch(root / name / f"{name}_{n:04d}.jpg")
    touch(root / "Dee_D" / "Dee_D_0001.png")
    return root


def write(path, text):
    path.write_text(text)
    return str(path)


VIEW2 = "2\t1\nAnn_A\t1\t2\nAnn_A\t3\tCid_C\t1\nBob_B\t1\t2\nBob_B\t2\tDee_D\t1\n"
VIEW1 = "2\nAnn_A 1 3\nBob_B 2 1\nAnn_A 2 Bob_B 1\nCid_C 1 Dee_D 1\n"


def test_read_view2(lfw, tmp_path):
    pf = write(tmp_path / "pairs.txt", VIEW2)
    pairs = read_pairs(pf, str(lfw))
    r = str(lfw)
    assert pairs == [
        Pair(f"{r}/Ann_A/Ann_A_0001.jpg", f"{r}/Ann_A/Ann_A_0002.jpg", True, 2, 1),
        Pair(f"{r}/Ann_A/Ann_A_0003.jpg", f"{r}/Cid_C/Cid_C_0001.jpg", False, 3, 1),
        Pair(f"{r}/Bob_B/Bob_B_0001.jpg", f"{r}/Bob_B/Bob_B_0002.jpg", True, 4, 2),
        Pair(f"{r}/Bob_B/Bob_B_0002.jpg", f"{r}/Dee_D/Dee_D_0001.png", False, 5, 2),  # ext found
    ]
    assert [p.line for p in read_pairs(pf, lfw, folds=[2])] == [4, 5]
    with pytest.raises(UserError, match="fold 3 does not exist; the file holds folds 1 to 2"):
        read_pairs(pf, lfw, folds=[3])


def test_read_view1_and_explicit_extension(lfw, tmp_path):
    pf = write(tmp_path / "pairsDevTest.txt", VIEW1.replace("Dee_D 1", "Bob_B 2"))
    for ext in ("jpg", ".jpg", None):
        pairs = read_pairs(pf, lfw, ext=ext)
        # View 1 is all same pairs then all different: interleaved so that sub-folds are balanced
        assert [p.issame for p in pairs] == [True, False, True, False]
        assert [p.line for p in pairs] == [2, 4, 3, 5]
        assert all(p.fold is None for p in pairs)
        assert pairs[2].path_a == os.path.join(str(lfw), "Bob_B", "Bob_B_0002.jpg")
    with pytest.raises(UserError, match="needs an LFW View 2 file"):
        read_pairs(pf, lfw, folds=[1])


def test_missing_image_names_file_and_line(lfw, tmp_path):
    pf = write(tmp_path / "pairs.txt", VIEW2.replace("Bob_B\t1\t2", "Bob_B\t1\t9"))
    with pytest.raises(UserError) as err:
        read_pairs(pf, lfw)
    assert str(err.value) == f"{pf}:4: image not found: {lfw}/Bob_B/Bob_B_0009.*"
    # with an extension given, the full path; the .png is not a .jpg, and the count of further lines
    with pytest.raises(UserError) as err:
        read_pairs(pf, lfw, ext="jpg")
    assert str(err.value) == f"{pf}:4: image not found: {lfw}/Bob_B/Bob_B_0009.jpg (1 more lines miss images)"


@pytest.mark.parametrize("bad", ["Ann_A\t1", "Ann_A\tone\t2", "Ann_A\t0\t2", "Ann_A 1 2 3 4 5",
                                 "Ann_A\t1\tAnn_A\t2"])
def test_malformed_line_names_file_and_line(lfw, tmp_path, bad):
    # a blank line before it: line numbers count physical lines
    pf = write(tmp_path / "pairs.txt", VIEW2.replace("Ann_A\t3\tCid_C\t1\n", f"\n{bad}\n"))
    with pytest.raises(UserError) as err:
        read_pairs(pf, lfw)
    assert str(err.value) == f"{pf}:4: {MALFORMED} '{bad}'"


def test_header_and_count_errors(lfw, tmp_path):
    with pytest.raises(UserError, match=r"pairs.txt:1: expected a header 'n_folds n_per_fold'.*received 'ten 300'"):
        read_pairs(write(tmp_path / "pairs.txt", "ten 300\n" + VIEW2.split("\n", 1)[1]), lfw)
    with pytest.raises(UserError, match=r"pairs.txt:1: header '2 1' announces 4 pairs, the file holds 3"):
        read_pairs(write(tmp_path / "pairs.txt", VIEW2.rsplit("\n", 2)[0] + "\n"), lfw)
    with pytest.raises(UserError, match=r"pairs.txt:1: header '3' announces 6 pairs, the file holds 4"):
        read_pairs(write(tmp_path / "pairs.txt", "3" + VIEW1[1:]), lfw)
    with pytest.raises(UserError, match="empty pairs file"):
        read_pairs(write(tmp_path / "pairs.txt", "\n\n"), lfw)
    with pytest.raises(UserError, match="nope.txt: pairs file not found"):
        read_pairs(str(tmp_path / "nope.txt"), lfw)
    with pytest.raises(UserError, match="image folder not found"):
        read_pairs(write(tmp_path / "pairs.txt", VIEW2), tmp_path / "missing")


def test_ambiguous_stem_needs_an_extension(lfw, tmp_path):
    touch(lfw / "Ann_A" / "Ann_A_0001.png")
    pf = write(tmp_path / "pairs.txt", VIEW2)
    with pytest.raises(UserError, match=r"pairs.txt:2: several images match .*Ann_A_0001\.\*: "
                                        r"Ann_A_0001.jpg, Ann_A_0001.png; set the image extension"):
        read_pairs(pf, lfw)
    # with the extension given, line 2 resolves; the .png of line 5 is then missing
    with pytest.raises(UserError, match=r"pairs.txt:5: image not found: .*Dee_D_0001.jpg$"):
        read_pairs(pf, lfw, ext="jpg")


def test_read_mbembed_format(lfw, tmp_path):
    outside = tmp_path / "elsewhere" / "x.jpg"
    touch(outside)
    text = (f"{MBEMBED_HEADER}\n# a comment\nAnn_A/Ann_A_0001.jpg\tAnn_A/Ann_A_0002.jpg\t1\n\n"
            f"Dee_D/Dee_D_0001.png\t{outside}\t0\n")
    pf = write(tmp_path / "p.tsv", text)
    pairs = read_pairs(pf, lfw)
    assert pairs == [
        Pair(os.path.join(str(lfw), "Ann_A/Ann_A_0001.jpg"), os.path.join(str(lfw), "Ann_A/Ann_A_0002.jpg"), True, 3),
        Pair(os.path.join(str(lfw), "Dee_D/Dee_D_0001.png"), str(outside), False, 5),
    ]
    with pytest.raises(UserError, match=r"p.tsv:3: expected 'path_a<TAB>path_b<TAB>same'"):
        read_pairs(write(tmp_path / "p.tsv", text.replace("\t1\n", "\tyes\n")), lfw)
    with pytest.raises(UserError, match=r"p.tsv:5: image not found: .*Dee_D_0002.png"):
        read_pairs(write(tmp_path / "p.tsv", text.replace("Dee_D_0001", "Dee_D_0002")), lfw)


# --------------------------------------------------------------------------- make_pairs


@pytest.fixture
def people(tmp_path):
    """8 identities, LFW-named, 1 to 5 images each."""
    root = tmp_path / "people"
    for k, count in enumerate((5, 4, 3, 2, 2, 1, 1, 3)):
        name = f"Person_{chr(65 + k)}"
        for n in range(1, count + 1):
            touch(root / name / f"{name}_{n:04d}.jpg")
    touch(root / ".hidden" / "x.jpg")
    touch(root / "Empty" / "notes.txt")
    return root


def test_identity_folders(people):
    ids = identity_folders(people)
    assert list(ids) == [f"Person_{c}" for c in "ABCDEFGH"]
    assert ids["Person_A"] == [os.path.join(str(people), "Person_A", f"Person_A_{n:04d}.jpg") for n in range(1, 6)]
    with pytest.raises(UserError, match="image folder not found"):
        identity_folders(people / "nope")


def test_make_pairs_is_deterministic_and_balanced(people):
    ids = identity_folders(people)
    pairs = make_pairs(ids, 20, n_folds=10, seed=3)
    assert pairs == make_pairs(dict(reversed(list(ids.items()))), 20, n_folds=10, seed=3)
    assert pairs != make_pairs(ids, 20, n_folds=10, seed=4)
    assert len(pairs) == 40 and sum(p.issame for p in pairs) == 20
    assert [p.line for p in pairs] == list(range(2, 42))
    assert [p.fold for p in pairs] == [f for f in range(1, 11) for _ in range(4)]
    # per fold: 2 same then 2 different, so every KFold test fold is half same
    assert [p.issame for p in pairs] == [True, True, False, False] * 10
    for _, test in fold_indices(len(pairs), 10):
        assert sum(pairs[i].issame for i in test) == len(test) / 2
    for p in pairs:
        same_person = os.path.dirname(p.path_a) == os.path.dirname(p.path_b)
        assert same_person == p.issame and p.path_a != p.path_b
    keys = {tuple(sorted((p.path_a, p.path_b))) for p in pairs}
    assert len(keys) == 40  # no pair twice


def test_make_pairs_errors(people):
    ids = identity_folders(people)
    with pytest.raises(UserError, match=r"\(25\) must be a positive multiple of the 10 folds"):
        make_pairs(ids, 25)
    # same pairs available: C(5,2)+C(4,2)+C(3,2)+1+1+C(3,2) = 10+6+3+1+1+3 = 24
    with pytest.raises(UserError, match="6 identities with 2\\+ images give 24 distinct same-person pairs, fewer than the 30"):
        make_pairs(ids, 30)
    assert len(make_pairs(ids, 24, n_folds=4)) == 48  # all of them
    with pytest.raises(UserError, match="give 0 distinct same-person pairs"):
        make_pairs({"A": ["a1"], "B": ["b1"]}, 10)
    with pytest.raises(UserError, match="1 identities give 0 distinct different-person pairs"):
        make_pairs({"A": ["a1", "a2", "a3", "a4", "a5"]}, 10, n_folds=1)


# --------------------------------------------------------------------------- writing


def test_write_read_round_trip_lfw_format(people, tmp_path):
    pairs = make_pairs(identity_folders(people), 20, n_folds=10, seed=0)
    out = tmp_path / "run" / "pairs.txt"
    assert write_pairs(pairs, str(out), str(people), n_folds=10) == "lfw"
    lines = out.read_text().splitlines()
    assert lines[0] == "10\t2" and len(lines) == 41
    assert len(lines[1].split("\t")) == 3 and len(lines[3].split("\t")) == 4
    assert read_pairs(str(out), str(people)) == pairs


def test_write_read_round_trip_other_names(tmp_path):
    root = tmp_path / "faces"
    for name in ("alice", "bob smith", "carol"):
        for f in ("front.jpg", "side.png", "3.jpeg"):
            touch(root / name / f)
    pairs = make_pairs(identity_folders(root), 6, n_folds=2, seed=1)
    out = tmp_path / "pairs.tsv"
    assert write_pairs(pairs, str(out), str(root), n_folds=2) == "mbembed"
    assert out.read_text().splitlines()[0] == MBEMBED_HEADER
    back = read_pairs(str(out), str(root))
    assert [(p.path_a, p.path_b, p.issame, p.line) for p in back] == \
        [(p.path_a, p.path_b, p.issame, p.line) for p in pairs]


def test_write_falls_back_when_not_in_view2_folds(lfw, tmp_path):
    # View 1 order (all same, then all different) is not View 2's layout: the mbembed format keeps it
    pairs = sorted(read_pairs(write(tmp_path / "dev.txt", VIEW1), lfw), key=lambda p: (not p.issame, p.line))
    assert write_pairs(pairs, str(tmp_path / "out.txt"), str(lfw), n_folds=2) == "mbembed"
    assert [(p.path_a, p.issame) for p in read_pairs(str(tmp_path / "out.txt"), lfw)] == \
        [(p.path_a, p.issame) for p in pairs]
    # an ambiguous stem cannot be written the LFW way either
    view2 = read_pairs(write(tmp_path / "pairs.txt", VIEW2), lfw)
    touch(lfw / "Ann_A" / "Ann_A_0001.png")
    assert write_pairs(view2, str(tmp_path / "out2.txt"), str(lfw), n_folds=2) == "mbembed"
    assert read_pairs(str(tmp_path / "out2.txt"), lfw)[0].path_a.endswith("Ann_A_0001.jpg")


def test_write_pair_distances_csv(lfw, tmp_path):
    pairs = read_pairs(write(tmp_path / "pairs.txt", VIEW2), lfw)
    out = tmp_path / "pair_distances.csv"
    write_pair_distances_csv(str(out), pairs, np.array([0.5, 0.7, 1.2, 1.5]), threshold=1.0)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["pair", "line", "path_a", "path_b", "distance", "same", "predicted", "correct"]
    assert [(r["pair"], r["line"], r["same"], r["predicted"], r["correct"]) for r in rows] == [
        ("0", "2", "1", "1", "1"), ("1", "3", "0", "1", "0"), ("2", "4", "1", "0", "0"), ("3", "5", "0", "0", "1")]
    assert float(rows[1]["distance"]) == 0.7 and rows[3]["path_b"] == pairs[3].path_b
    with pytest.raises(ValueError, match="4 pairs but 3 distances"):
        write_pair_distances_csv(str(out), pairs, [0.1, 0.2, 0.3], 1.0)


def test_fold_selection_interleaves_same_and_different(lfw, tmp_path):
    pf = write(tmp_path / "pairs.txt", VIEW2)
    everything = read_pairs(pf, lfw)
    one = read_pairs(pf, lfw, folds=[2])
    assert {p.line for p in one} == {p.line for p in everything if p.fold == 2}
    assert [p.issame for p in one] == [True, False] * (len(one) // 2)
    # the full file keeps its order (each LFW fold is already balanced)
    assert [p.line for p in everything] == sorted(p.line for p in everything)


@pytest.mark.parametrize("line", ["..\t1\t2", "Ann_A\t1\t..\t1", "/etc\t1\t2", "Ann_A/../..\t1\t2", ".\t1\t2"])
def test_lfw_names_never_leave_the_root(lfw, tmp_path, line):
    name = line.split("\t")[2] if line.count("\t") == 3 else line.split("\t")[0]
    pf = write(tmp_path / "pairs.txt", f"1\n{line}\nAnn_A\t1\tBob_B\t1\n")
    with pytest.raises(UserError, match=f"{pf}:2: '{name}' is not an identity folder name"):
        read_pairs(pf, str(lfw))


def test_mbembed_relative_paths_stay_under_the_root(lfw, tmp_path):
    touch(tmp_path / "outside.jpg")
    pf = write(tmp_path / "pairs.txt", f"{MBEMBED_HEADER}\nAnn_A/Ann_A_0001.jpg\t../outside.jpg\t0\n")
    with pytest.raises(UserError, match=rf"{pf}:2: '\.\./outside\.jpg' lies outside the image root"):
        read_pairs(pf, str(lfw))
    # an absolute path is taken as written (write_pairs writes images outside the root that way)
    pf = write(tmp_path / "abs.txt", f"{MBEMBED_HEADER}\nAnn_A/Ann_A_0001.jpg\t{tmp_path / 'outside.jpg'}\t0\n")
    assert read_pairs(pf, str(lfw))[0].path_b == str(tmp_path / "outside.jpg")
