"""`align_folder` mechanics with a stand-in detector: layout, bad files, no-face rules, resume, report.

The stand-in finds one face (fixed landmarks) in every image with texture, none in flat images,
and two in images whose top-left pixel is pure red; it counts the images it is asked about.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mobilenet_embed import atomic
from mobilenet_embed.align.alignment import AlignSpec
from mobilenet_embed.align.detector import Face
from mobilenet_embed.align.folder import JOURNAL, REPORT, align_folder, read_journal
from mobilenet_embed.errors import UserError


class StandIn:
    name = "mtcnn"  # stands in for the default detector

    def __init__(self, fail_on_call=None):
        self.calls, self.images, self.fail_on_call = 0, 0, fail_on_call

    def detect(self, images):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt
        self.images += len(images)
        out = []
        for im in images:
            if im.std() < 1.0:
                out.append([])
                continue
            h, w = im.shape[:2]
            marks = np.array([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.72], [0.62, 0.72]]) * [w, h]
            face = Face(np.array([0.2 * w, 0.2 * h, 0.8 * w, 0.9 * h]), 0.99, marks)
            small = Face(np.array([0, 0, 10, 10], float), 0.9, marks * 0.1)
            out.append([face, small] if tuple(im[0, 0]) == (255, 0, 0) else [face])
        return out


def _textured(seed, red_corner=False):
    rng = np.random.default_rng(seed)
    im = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    if red_corner:
        im[0, 0] = (255, 0, 0)
    return im


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    (root / "ann").mkdir(parents=True)
    (root / "bob").mkdir()
    Image.fromarray(_textured(0)).save(root / "ann" / "a1.png")
    Image.fromarray(_textured(1, red_corner=True)).save(root / "ann" / "a2.png")
    Image.fromarray(_textured(2)).save(root / "ann" / "a3.bmp")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / "bob" / "grey.png")
    Image.fromarray(_textured(3)).save(root / "bob" / "b1.jpg", quality=95)
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_align_folder_layout_counts_and_report(raw, tmp_path):
    out = tmp_path / "aligned"
    det = StandIn()
    report = align_folder(str(raw), str(out), AlignSpec(size=32, no_face="skip"), det, batch_size=2,
                          progress=False, log=lambda *_: None)
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert written == ["align_journal.jsonl", "align_report.json", "ann/a1.png", "ann/a2.png",
                       "ann/a3.bmp.png", "bob/b1.jpg"]
    for rel in written[2:]:
        with Image.open(out / rel) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert det.images == 5  # the broken file never reaches the detector
    assert (report["images"], report["aligned"], report["no_face"], report["no_face_skipped"],
            report["several_faces"], report["unreadable"]) == (6, 4, 1, 1, 1, 1)
    assert report["no_face_files"] == [os.path.join("bob", "grey.png")]
    assert report["several_faces_files"] == [os.path.join("ann", "a2.png")]
    assert report["unreadable_files"][0][0].endswith("broken.jpg") and "JPEG" in report["unreadable_files"][0][1]
    assert report["pending"] == 0 and report["seconds"] > 0
    assert json.loads((out / REPORT).read_text()) == report


def test_no_face_center_writes_a_central_crop(raw, tmp_path):
    out = tmp_path / "aligned"
    report = align_folder(str(raw), str(out), AlignSpec(size=32, no_face="center"), StandIn(), batch_size=8,
                          progress=False, log=lambda *_: None)
    assert (report["no_face"], report["no_face_center_cropped"], report["written"]) == (1, 1, 5)
    with Image.open(out / "bob" / "grey.png") as im:
        assert np.asarray(im).mean() == pytest.approx(128, abs=1)


def test_resume_does_not_redo_done_files(raw, tmp_path):
    out = tmp_path / "aligned"
    spec = AlignSpec(size=32, no_face="skip")
    with pytest.raises(KeyboardInterrupt):  # killed during the second batch
        align_folder(str(raw), str(out), spec, StandIn(fail_on_call=2), batch_size=2, progress=False,
                     log=lambda *_: None)
    _, done, _ = read_journal(str(out / JOURNAL))
    assert len(done) == 2
    first = {rel: os.stat(out / e["out"]).st_mtime_ns for rel, e in done.items() if e["out"]}
    with open(out / JOURNAL, "a") as fh:
        fh.write('{"file": "half a li')  # the tail of a line cut by the kill
    (out / "ann" / f"{atomic.TMP_PREFIX}a2.png-x1y2.png").write_bytes(b"half a crop")  # a write cut by the kill
    det = StandIn()
    report = align_folder(str(raw), str(out), spec, det, batch_size=2, progress=False, log=lambda *_: None)
    assert det.images == 3  # 5 readable images, 2 done before
    assert {rel: os.stat(out / done[rel]["out"]).st_mtime_ns for rel in first} == first
    assert report["this_run"]["resumed"] == 2 and report["runs"] == 2
    assert not (out / "ann" / f"{atomic.TMP_PREFIX}a2.png-x1y2.png").exists()
    assert (report["aligned"], report["no_face"], report["several_faces"], report["pending"]) == (4, 1, 1, 0)
    det = StandIn()
    again = align_folder(str(raw), str(out), spec, det, batch_size=2, progress=False, log=lambda *_: None)
    assert det.calls == 0 and again["aligned"] == 4 and again["this_run"]["processed"] == 0
    Image.fromarray(_textured(9)).save(raw / "ann" / "a1.png")  # replaced since: aligned again
    os.utime(raw / "ann" / "a1.png", ns=(1, 1))
    os.remove(raw / "ann" / "a3.bmp")  # removed since: no longer counted
    det = StandIn()
    third = align_folder(str(raw), str(out), spec, det, batch_size=2, progress=False, log=lambda *_: None)
    assert det.images == 1 and third["aligned"] == 3 and third["images"] == 5


def test_refuses_other_settings_and_out_inside_data(raw, tmp_path):
    out = tmp_path / "aligned"
    align_folder(str(raw), str(out), AlignSpec(size=32), StandIn(), progress=False, log=lambda *_: None)
    with pytest.raises(UserError, match="other settings"):
        align_folder(str(raw), str(out), AlignSpec(size=48), StandIn(), progress=False, log=lambda *_: None)
    with pytest.raises(UserError, match="inside"):
        align_folder(str(raw), str(raw / "aligned"), AlignSpec(), StandIn(), progress=False, log=lambda *_: None)
    with pytest.raises(UserError, match="folder not found"):
        align_folder(str(tmp_path / "nope"), str(out), AlignSpec(), StandIn(), progress=False, log=lambda *_: None)


def test_aligned_folder_reads_back_as_training_data(raw, tmp_path):
    from mobilenet_embed.config import load_config
    from mobilenet_embed.data import inspect_data

    out = tmp_path / "aligned"
    align_folder(str(raw), str(out), AlignSpec(size=32), StandIn(), progress=False, log=lambda *_: None)
    cfg = load_config(None, ["data.source=folder", f"data.path={out}", "data.check_cache=null"])
    index, report = inspect_data(cfg.data)
    assert report.bad_files == [] and report.images == 5 and report.ignored_files == 2  # journal + report
    assert report.image_sizes == {"32x32": 5}


def test_aligned_batches_feed_the_model_preprocessing(raw, tmp_path):
    from mobilenet_embed.align.alignment import align_images, decode_file
    from mobilenet_embed.align.inference import AlignCounts, aligned_batches
    from mobilenet_embed.config import load_config
    from mobilenet_embed.data import preprocess_images

    cfg = load_config(None, ["data.align_template=arcface", "data.align_size=48", "data.image_size=32",
                             "data.crop_fraction=0.9", "data.check_cache=null"])
    paths = [str(raw / "ann" / "a1.png"), str(raw / "bob" / "grey.png"), str(raw / "ann" / "a2.png")]
    counts, det = AlignCounts(), StandIn()
    batches = list(aligned_batches(cfg.data, paths, batch_size=2, detector=det, counts=counts))
    assert [b.shape for b in batches] == [(2, 32, 32, 3), (1, 32, 32, 3)] and det.calls == 2
    assert (counts.aligned, counts.no_face, counts.several_faces) == (2, 1, 1)
    assert counts.no_face_paths == [paths[1]]
    expected = align_images([decode_file(paths[0])], AlignSpec(size=48), StandIn())[0].image
    np.testing.assert_allclose(batches[0][0], preprocess_images(expected, 32, 0.9).numpy(), atol=1e-6)
    with pytest.raises(UserError, match="broken.jpg: unreadable image"):
        list(aligned_batches(cfg.data, [str(raw / "bob" / "broken.jpg")], detector=StandIn()))
    with pytest.raises(UserError, match="data.align_template"):
        list(aligned_batches(load_config(None, []).data, paths, detector=StandIn()))


def test_config_and_aligned_folder_must_agree(raw, tmp_path):
    from mobilenet_embed.align.folder import check_config_alignment
    from mobilenet_embed.config import load_config

    out = tmp_path / "aligned"
    align_folder(str(raw), str(out), AlignSpec(size=32), StandIn(), progress=False, log=lambda *_: None)
    base = ["data.source=folder", f"data.path={out}"]
    assert check_config_alignment(load_config(None, base + ["data.align_template=arcface",
                                                            "data.align_size=32"]).data) == []
    with pytest.raises(UserError, match="data.align_size: 112, but .* size 32"):
        check_config_alignment(load_config(None, base + ["data.align_template=arcface"]).data)
    with pytest.raises(UserError, match="data.align_template: 'loose'"):
        check_config_alignment(load_config(None, base + ["data.align_template=loose", "data.align_size=32"]).data)
    notes = check_config_alignment(load_config(None, base).data)
    assert len(notes) == 1 and "data.align_template=arcface data.align_size=32" in notes[0]
    raw_cfg = load_config(None, ["data.source=folder", f"data.path={raw}", "data.align_template=arcface"])
    assert "no align_report.json" in check_config_alignment(raw_cfg.data)[0]


def test_training_refuses_a_config_that_disagrees_with_its_aligned_folder(raw, tmp_path):
    from mobilenet_embed.config import load_config
    from mobilenet_embed.train import _load_data

    out = tmp_path / "aligned"
    align_folder(str(raw), str(out), AlignSpec(size=32), StandIn(), progress=False, log=lambda *_: None)
    cfg = load_config(None, ["data.source=folder", f"data.path={out}", "data.align_template=loose",
                             "data.align_size=32"])
    with pytest.raises(UserError, match="data.align_template"):
        _load_data(cfg, log=lambda *_: None)
