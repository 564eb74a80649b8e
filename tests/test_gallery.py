"""Gallery index: enrol (incremental, templates, from an export), remove, search and "unknown"."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mobilenet_embed import gallery as gallery_mod
from mobilenet_embed.cli import main
from mobilenet_embed.config import load_config
from mobilenet_embed.errors import UserError
from mobilenet_embed.gallery import (enroll, load_gallery, remove_identities, search_images,
                                     threshold_from_eval)
from mobilenet_embed.model import build_embedding_model
from harness import he_initialise


def _faces(root, names, n=3, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        os.makedirs(root / name, exist_ok=True)
        base = rng.integers(0, 255, (1, 1, 3))
        for j in range(n):
            img = np.clip(base + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype("uint8")
            Image.fromarray(img).save(root / name / f"{name}_{j + 1:04d}.png")
    return str(root)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Two batches of synthetic people (distinct colours): A-C and D-E, 3 images each."""
    base = tmp_path_factory.mktemp("faces")
    first = _faces(base / "first", ["Ann", "Bob", "Cid"], seed=0)
    second = _faces(base / "second", ["Dan", "Eve"], seed=1)
    return first, second


def _model(path, seed):
    model = build_embedding_model(image_size=32, alpha=0.25, embedding_size=16)
    he_initialise(model, seed=seed)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return _model(str(folder / "m.keras"), 1), _model(str(folder / "other.keras"), 2)


CFG = load_config(None, [])


def cli(*args):
    return CliRunner().invoke(main, list(args))


def test_enroll_writes_a_readable_versioned_index(faces, models, tmp_path):
    index = str(tmp_path / "g")
    res = enroll(CFG, models[0], index, data=faces[0])
    assert (res.added_images, res.new_identities, res.n_identities, res.n_rows) == (9, 3, 3, 9)
    meta = json.loads((tmp_path / "g" / "gallery.json").read_text())
    assert meta["format"] == "mbembed-gallery" and meta["version"] == 1 and meta["mode"] == "images"
    assert len(meta["model"]["sha256"]) == 64 and meta["model"]["image_size"] == 32
    emb = np.load(tmp_path / "g" / meta["embeddings_file"])
    g = load_gallery(index)
    np.testing.assert_array_equal(g.embeddings, emb)
    assert [r["identity"] for r in meta["rows"]] == ["Ann"] * 3 + ["Bob"] * 3 + ["Cid"] * 3
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not [f for f in os.listdir(index) if f.startswith(".tmp")]


def test_incremental_enrolment_appends_without_re_embedding(faces, models, tmp_path, monkeypatch):
    index = str(tmp_path / "g")
    enroll(CFG, models[0], index, data=faces[0])
    before = load_gallery(index)
    embedded = []
    real = gallery_mod.embed_images
    monkeypatch.setattr(gallery_mod, "embed_images",
                        lambda loaded, paths, bs=64: embedded.extend(paths) or real(loaded, paths, bs))
    res = enroll(CFG, models[0], index, data=faces[1])
    assert (res.added_images, res.new_identities, res.n_identities) == (6, 2, 5)
    assert len(embedded) == 6 and all("second" in p for p in embedded)
    after = load_gallery(index)
    np.testing.assert_array_equal(after.embeddings[:9], before.embeddings)
    assert after.generation == before.generation + 1
    assert len([f for f in os.listdir(index) if f.startswith("embeddings-")]) == 1
    again = enroll(CFG, models[0], index, data=faces[1])  # same images: nothing to do
    assert again.added_images == 0 and again.skipped_duplicates == 6 and again.n_rows == 15


def test_templates_average_and_grow_incrementally(faces, models, tmp_path):
    whole = str(tmp_path / "whole")
    enroll(CFG, models[0], whole, data=faces[0], mode="templates")
    g = load_gallery(whole)
    assert len(g.rows) == 3 and [len(r["sources"]) for r in g.rows] == [3, 3, 3]
    images = str(tmp_path / "img")
    enroll(CFG, models[0], images, data=faces[0])
    per_image = load_gallery(images).embeddings
    mean = per_image[:3].sum(0)
    np.testing.assert_allclose(g.embeddings[0], mean / np.linalg.norm(mean), atol=1e-6)
    # Ann's images in two steps give the same template as in one
    split = tmp_path / "split"
    for part, names in (("p1", ["Ann_0001.png"]), ("p2", ["Ann_0002.png", "Ann_0003.png"])):
        os.makedirs(split / part / "Ann")
        for n in names:
            os.link(os.path.join(faces[0], "Ann", n), split / part / "Ann" / n)
    step = str(tmp_path / "step")
    enroll(CFG, models[0], step, data=str(split / "p1"), mode="templates")
    enroll(CFG, models[0], step, data=str(split / "p2"))
    np.testing.assert_allclose(load_gallery(step).embeddings[0], g.embeddings[0], atol=1e-6)
    with pytest.raises(UserError, match="keeps templates"):
        enroll(CFG, models[0], step, data=faces[1], mode="images")


def test_search_identifies_enrolled_and_says_unknown(faces, models, tmp_path):
    index = str(tmp_path / "g")
    enroll(CFG, models[0], index, data=faces[0])
    known = os.path.join(faces[0], "Bob", "Bob_0002.png")
    stranger = os.path.join(faces[1], "Eve", "Eve_0001.png")
    results, _ = search_images(CFG, index, [known, stranger], top_k=2)
    assert results[0].matches[0].identity == "Bob" and results[0].matches[0].distance < 1e-5
    assert [len(r.matches) for r in results] == [2, 2] and results[1].identity is not None  # closed set
    cut = (results[0].matches[0].distance + results[1].matches[0].distance) / 2
    results, _ = search_images(CFG, index, [known, stranger], top_k=2, threshold=cut)
    assert results[0].identity == "Bob" and results[1].identity is None
    assert results[1].to_dict()["identity"] == "unknown" and results[1].to_dict()["known"] is False
    out = cli("search", "--index", index, known, stranger, "--threshold", str(cut), "--format", "jsonl")
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["identity"] for x in lines] == ["Bob", "unknown"] and len(lines[0]["matches"]) == 3
    out = cli("search", "--index", index, known, "--format", "csv", "--top-k", "2")
    assert out.stdout.splitlines()[0] == "query,decision,rank,identity,distance,source"
    assert out.stdout.splitlines()[1].split(",")[1:4] == ["Bob", "1", "Bob"]


def test_another_model_is_refused_with_one_line(faces, models, tmp_path):
    index = str(tmp_path / "g")
    enroll(CFG, models[0], index, data=faces[0])
    query = os.path.join(faces[0], "Ann", "Ann_0001.png")
    out = cli("search", "--index", index, "--model", models[1], query)
    assert out.exit_code == 2 and out.stderr.startswith("Error: ") and len(out.stderr.splitlines()) == 1
    assert "not the one this gallery was enrolled with" in out.stderr
    with pytest.raises(UserError, match="not the one"):
        enroll(CFG, models[1], index, data=faces[1])


def test_remove_identity(faces, models, tmp_path):
    index = str(tmp_path / "g")
    enroll(CFG, models[0], index, data=faces[0])
    out = cli("gallery", "remove", "--index", index, "Bob")
    assert out.exit_code == 0 and "removed 1 identities (3 rows)" in out.output
    g = load_gallery(index)
    assert g.identities() == ["Ann", "Cid"] and len(g.embeddings) == 6
    results, _ = search_images(CFG, index, [os.path.join(faces[0], "Bob", "Bob_0001.png")], top_k=5)
    assert sorted(m.identity for m in results[0].matches) == ["Ann", "Cid"]  # top-5 of 2 identities
    with pytest.raises(UserError, match="not enrolled: Zed"):
        remove_identities(index, ["Zed"])


def test_enroll_from_an_embeddings_export(faces, models, tmp_path):
    from mobilenet_embed.export_embeddings import export_embeddings

    export_embeddings(CFG, models[0], faces[0], str(tmp_path / "exp"), progress=False)
    from_export = str(tmp_path / "a")
    enroll(CFG, models[0], from_export, embeddings=str(tmp_path / "exp"))
    from_images = str(tmp_path / "b")
    enroll(CFG, models[0], from_images, data=faces[0])
    a, b = load_gallery(from_export), load_gallery(from_images)
    assert [r["sources"] for r in a.rows] == [r["sources"] for r in b.rows]
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    with pytest.raises(UserError, match="not made by"):
        enroll(CFG, models[1], str(tmp_path / "c"), embeddings=str(tmp_path / "exp"))


def test_far_threshold_from_eval_pair_distances(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"distance": "squared-L2", "image_size": 32,
                                                       "crop_fraction": 1.0, "flip": False}))
    rows = ["pair,line,path_a,path_b,distance,same,predicted,correct"]
    diffs = [0.9, 1.3, 1.1, 1.7, 1.5, 2.0, 1.2, 1.9, 1.4, 1.6]
    rows += [f"{i},{i},a,b,{d},0,0,1" for i, d in enumerate(diffs)]
    rows += ["99,99,a,b,0.1,1,1,1"]
    (tmp_path / "pair_distances.csv").write_text("\n".join(rows) + "\n")
    found = threshold_from_eval(str(tmp_path), 0.1, "squared-L2")
    assert found["threshold"] == 1.1 and found["far"] == 0.1 and found["n_different"] == 10
    assert threshold_from_eval(str(tmp_path / "metrics.json"), 0.0, "squared-L2")["threshold"] == 0.9
    with pytest.raises(UserError, match="distance"):
        threshold_from_eval(str(tmp_path), 0.1, "cosine")


def test_bad_index_is_one_line(tmp_path):
    out = cli("gallery", "show", "--index", str(tmp_path))
    assert out.exit_code == 2 and "not a gallery index" in out.stderr


def test_eval_identification_protocol_end_to_end(faces, models, tmp_path):
    out = tmp_path / "ev"
    res = cli("eval", "--protocol", "identification", "--model", models[0], "--data", faces[0],
              "--make-id-protocol", "--out", str(out))
    assert res.exit_code == 0, res.output
    m = json.loads((out / "identification.json").read_text())
    assert m["n_gallery_identities"] == 3 and m["n_mated_probes"] == 6 and m["n_distractor_probes"] == 0
    assert m["rank_accuracy"]["1"] >= 0.5 and m["rank_accuracy"]["5"] == 1.0  # colours separate people
    for name in ("cmc.png", "det.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "probe_ranks.csv").read_text().splitlines()) == 7
    gallery_lines = [x for x in (out / "protocol" / "gallery.txt").read_text().splitlines() if not x.startswith("#")]
    assert len(gallery_lines) == 3
    # the written protocol reads back and gives the same numbers
    again = cli("eval", "--protocol", "identification", "--model", models[0], "--data", faces[0],
                "--id-protocol", str(out / "protocol"), "--out", str(tmp_path / "ev2"))
    assert again.exit_code == 0, again.output
    m2 = json.loads((tmp_path / "ev2" / "identification.json").read_text())
    assert m2["cmc"] == m["cmc"]
    bad = cli("eval", "--model", models[0], "--data", faces[0], "--gallery-mode", "templates")
    assert bad.exit_code == 2 and "only with --protocol identification" in bad.stderr


def test_fpir_threshold_from_identification_eval(faces, models, tmp_path):
    index = str(tmp_path / "g")
    enroll(CFG, models[0], index, data=faces[0])
    sha = load_gallery(index).model["sha256"]
    ev = tmp_path / "id"
    ev.mkdir()
    (ev / "identification.json").write_text(json.dumps({"distance": "squared-L2", "n_gallery_identities": 3,
                                                        "model_sha256": sha}))
    rows = ["probe,identity,mated,rank,own_distance,best_identity,best_distance", "p,Ann,1,1,0.1,Ann,0.1"]
    rows += [f"d{i},X{i},0,,,Ann,{d}" for i, d in enumerate([0.5, 0.3, 0.9, 0.7])]
    (ev / "probe_ranks.csv").write_text("\n".join(rows) + "\n")
    from mobilenet_embed.gallery import threshold_from_identification

    found = threshold_from_identification(str(ev), 0.25, "squared-L2")
    assert found["threshold"] == 0.5 and found["fpir"] == 0.25 and found["n_distractors"] == 4
    query = os.path.join(faces[0], "Ann", "Ann_0001.png")
    out = cli("search", "--index", index, query, "--fpir", "0.25", "--identification", str(ev), "--format", "jsonl")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.splitlines()[0])["threshold"] == 0.5
    assert "for FPIR 0.25 (achieved 0.2500 on 4 distractors" in out.stderr
    both = cli("search", "--index", index, query, "--fpir", "0.1", "--threshold", "1", "--identification", str(ev))
    assert both.exit_code == 2 and "not --threshold and --fpir" in both.stderr
    (ev / "identification.json").write_text(json.dumps({"distance": "squared-L2", "n_gallery_identities": 3,
                                                        "model_sha256": "0" * 64}))
    other = cli("search", "--index", index, query, "--fpir", "0.1", "--identification", str(ev))
    assert other.exit_code == 2 and "another model" in other.stderr
