"""The one crash-safe write (`mobilenet_embed.atomic`) and the JSON record helpers (`records`)."""

import json
import math
import os

import numpy as np
import pytest

from mobilenet_embed import atomic
from mobilenet_embed.records import jsonable


def test_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic.write_json(path, {"x": 1}, indent=1)  # the folder is created
    atomic.write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic.write_npy(tmp_path / "c.npy", np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), [0, 1, 2])
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "c.npy", "sub"]
    assert os.listdir(tmp_path / "sub") == ["a.json"]


def test_a_failing_writer_leaves_the_old_file(tmp_path):
    path = tmp_path / "m.txt"
    atomic.write_text(path, "old")
    seen = []

    def crash(tmp):
        seen.append(tmp)
        with open(tmp, "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(path, crash)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["m.txt"]
    # the temporary is hidden, unique, beside the target and keeps the extension
    name = os.path.basename(seen[0])
    assert os.path.dirname(seen[0]) == str(tmp_path) and name.startswith(".tmp-m.txt-") and name.endswith(".txt")


def test_replace_dir_puts_a_directory_over_another(tmp_path):
    final, new = tmp_path / "saved", tmp_path / "new"
    final.mkdir()
    (final / "old.pb").write_text("old")
    new.mkdir()
    (new / "new.pb").write_text("new")
    atomic.replace_dir(str(new), str(final))
    assert os.listdir(final) == ["new.pb"] and sorted(os.listdir(tmp_path)) == ["saved"]


def test_jsonable_gives_valid_json():
    value = {"a": np.float32(0.5), "b": np.arange(2), 3: (np.int64(4), float("nan")), "c": -math.inf}
    out = jsonable(value)
    assert out == {"a": 0.5, "b": [0, 1], "3": [4, "nan"], "c": "-inf"}
    json.dumps(out, allow_nan=False)
