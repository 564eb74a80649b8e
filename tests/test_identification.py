"""Identification metrics on hand-made distance matrices, and the protocol files."""

import numpy as np
import pytest

from mobilenet_embed.errors import UserError
from mobilenet_embed.identification import (cmc_curve, det_curve, dir_at_fpir, identification_metrics,
                                            lfw_people_fold, make_protocol, read_protocol, threshold_at_rate,
                                            true_match_ranks, write_protocol)

# 3 gallery identities; probes 0-3 mated (labels), probes 4-6 distractors (-1)
DIST = np.array([
    [0.2, 0.9, 1.5],   # own 0 at rank 1
    [0.8, 0.5, 0.3],   # own 1 at rank 2 (identity 2 closer)
    [1.0, 1.2, 0.9],   # own 2 at rank 1
    [0.1, 0.4, 0.6],   # own 2 at rank 3
    [1.1, 1.4, 1.3],   # distractor, best 1.1
    [0.7, 1.6, 1.8],   # distractor, best 0.7
    [1.9, 1.5, 1.7],   # distractor, best 1.5
])
LABELS = np.array([0, 1, 2, 2, -1, -1, -1])


def test_ranks_and_cmc():
    np.testing.assert_array_equal(true_match_ranks(DIST, LABELS), [1, 2, 1, 3])
    np.testing.assert_allclose(cmc_curve(DIST, LABELS), [0.5, 0.75, 1.0])


def test_threshold_at_rate_counts_strictly_below():
    d = [0.7, 1.1, 1.5]
    assert threshold_at_rate(d, 0.0) == 0.7      # nothing below 0.7
    assert threshold_at_rate(d, 0.34) == 1.1     # floor(1.02) = 1 impostor allowed
    assert threshold_at_rate(d, 2 / 3) == 1.5
    assert threshold_at_rate(d, 1.0) == float("inf")
    with pytest.raises(UserError):
        threshold_at_rate(d, 1.5)


def test_dir_at_fpir_by_hand():
    zero, third = dir_at_fpir(DIST, LABELS, [0.0, 0.34])
    # t = 0.7: rank-1 mated probes with own distance < 0.7: probe 0 (0.2); probe 2 (0.9) is not
    assert zero["threshold"] == 0.7 and zero["fpir"] == 0.0 and zero["dir"] == 0.25
    # t = 1.1: probes 0 and 2; one distractor (0.7) falsely accepted
    assert third["threshold"] == 1.1 and third["fpir"] == pytest.approx(1 / 3) and third["dir"] == 0.5
    assert zero["n_mated"] == 4 and zero["n_distractors"] == 3


def test_det_curve_is_monotone_and_ends_at_the_closed_set_rate():
    det = det_curve(DIST, LABELS)
    assert np.all(np.diff(det["fpir"]) >= 0) and np.all(np.diff(det["fnir"]) <= 0)
    assert det["fpir"][0] == 0 and det["fpir"][-1] == 1.0
    assert det["fnir"][-1] == pytest.approx(0.5)  # 1 - rank-1 rate: an open set cannot beat it


def test_identification_metrics_dict():
    m = identification_metrics(DIST, LABELS, ranks=(1, 5), fpir_targets=(0.0,))
    assert m["rank_accuracy"] == {"1": 0.5, "5": 1.0}  # rank 5 > G: the whole gallery
    assert m["n_gallery_identities"] == 3 and m["n_mated_probes"] == 4 and m["n_distractor_probes"] == 3


def test_make_protocol_is_seeded_and_puts_singletons_in_distractors():
    people = {"A": ["A/1", "A/2", "A/3"], "B": ["B/1"], "C": ["C/1", "C/2"]}
    p = make_protocol(people, 1, seed=3)
    assert p == make_protocol(people, 1, seed=3)
    assert [n for n, _ in p.gallery] == ["A", "C"] and len(p.probes) == 3
    assert p.distractors == [("B", "B/1")]
    assert {x for _, x in p.gallery + p.probes} == {"A/1", "A/2", "A/3", "C/1", "C/2"}
    draws = {tuple(make_protocol(people, 1, seed=s).gallery) for s in range(10)}
    assert len(draws) > 1


def test_protocol_files_round_trip_and_errors(tmp_path):
    root = tmp_path / "img"
    for rel in ("A/a1.jpg", "A/a2.jpg", "B/b1.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    p = make_protocol({"A": ["A/a1.jpg", "A/a2.jpg"], "B": ["B/b1.jpg"]}, 1, seed=0)
    write_protocol(p, str(tmp_path / "proto"), header="test protocol\nseed 0")
    back = read_protocol(str(tmp_path / "proto"), str(root))
    assert [(n, x[len(str(root)) + 1:]) for n, x in back.gallery + back.probes + back.distractors] == \
        p.gallery + p.probes + p.distractors
    (tmp_path / "proto" / "probes.txt").write_text("A\tA/missing.jpg\n")
    with pytest.raises(UserError, match="probes.txt:1: image not found"):
        read_protocol(str(tmp_path / "proto"), str(root))
    (tmp_path / "proto" / "probes.txt").write_text("B\tB/b1.jpg\n")
    with pytest.raises(UserError, match="not enrolled"):
        read_protocol(str(tmp_path / "proto"), str(root))


def test_lfw_people_fold(tmp_path):
    people = tmp_path / "people.txt"
    people.write_text("2\n2\nAnn\t2\nBob\t1\n1\nCid\t3\n")
    assert lfw_people_fold(str(people), 1) == {"Ann": ["Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg"],
                                               "Bob": ["Bob/Bob_0001.jpg"]}
    assert len(lfw_people_fold(str(people), 2)["Cid"]) == 3
    with pytest.raises(UserError, match="--fold"):
        lfw_people_fold(str(people), 3)
