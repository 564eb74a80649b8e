"""Checkpoints that survive what goes wrong: a lost index (rebuilt from the folders), a damaged
latest checkpoint (fall back to the newest one that restores), a full or read-only disk (one
`Error:` line, the previous checkpoint and its index intact, no temporary left behind)."""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from mobilenet_embed import atomic
from mobilenet_embed import checkpoints as ck
from mobilenet_embed.errors import UserError

# A run of a few seconds: checkpoints at steps 1 and 2 (keep 3), no validation, one traced step.
TINY = [
    "data.source=synthetic", "data.image_size=32", "data.synthetic_identities=8",
    "data.synthetic_images_per_identity=2", "data.val_identities=0", "model.alpha=0.25",
    "model.embedding_size=8", "train.identities_per_batch=2", "train.images_per_identity=2",
    "train.epochs=1", "train.steps_per_epoch=2", "train.log_every_steps=1",
    "train.checkpoint_every_steps=1", "train.keep_checkpoints=3",
]


def _sets(*extra):
    return [a for item in TINY + list(extra) for a in ("--set", item)]


def _tree(folder):
    """Every file and folder under `folder`, relative."""
    out = []
    for root, dirs, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in dirs + files]
    return sorted(out)


def _manager(directory, var, log=None, keep=3):
    return ck.CheckpointManager(str(directory), tf.train.Checkpoint(v=var), keep=keep, log=log)


def _three_checkpoints(directory):
    """ckpt-1, ckpt-2, ckpt-3 (v = step, step, step) and best-2, each with its state."""
    var = tf.Variable([0.0, 0.0])
    manager = _manager(directory, var)
    for step in (1, 2, 3):
        var.assign([step, step])
        manager.save(step, {"best_accuracy": 0.5, "at": step})
        if step == 2:
            manager.save_best(2, {"accuracy": 0.75})
    return var


# --------------------------------------------------------------------------- a lost index


@pytest.mark.parametrize("damage", ["deleted", "garbage", "malformed"])
def test_lost_index_is_rebuilt_from_the_folders_and_nothing_is_deleted(tmp_path, damage):
    directory = tmp_path / "checkpoints"
    var = _three_checkpoints(directory)
    folders = sorted(os.listdir(directory))
    index_path = directory / ck.INDEX
    if damage == "deleted":
        index_path.unlink()
    elif damage == "garbage":
        index_path.write_bytes(b"\x00{half")
    else:
        index_path.write_text(json.dumps({"latest": {"name": "../../etc", "step": "x"}}))
    said = []
    manager = _manager(directory, var, log=said.append)
    assert sorted(os.listdir(directory)) == folders  # everything survives, the index is back
    assert len(said) == 1 and said[0].startswith(f"note: {index_path} is ")
    assert said[0].endswith(": rebuilt the index from the checkpoint folders (latest ckpt-00000003, "
                            "best best-00000002, 3 ckpt folder(s) kept)")
    latest = manager.latest()
    assert (latest.step, latest.state) == (3, {"best_accuracy": 0.5, "at": 3})
    best = manager.best()
    assert (os.path.basename(best.path), best.state) == ("best-00000002", {"accuracy": 0.75})
    assert json.loads(index_path.read_text())["kept"] == ["ckpt-00000001", "ckpt-00000002", "ckpt-00000003"]
    var.assign([0.0, 0.0])
    assert manager.restore(latest).step == 3
    np.testing.assert_array_equal(var.numpy(), [3.0, 3.0])


def test_rebuilt_latest_is_the_highest_complete_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    _three_checkpoints(directory)
    (directory / ck.INDEX).unlink()
    (directory / "ckpt-00000003" / "ckpt.index").unlink()  # incomplete: not the latest, not deleted
    index = ck.rebuild_index(str(directory))
    assert index["latest"] == {"name": "ckpt-00000002", "step": 2}
    assert index["state"] == {"best_accuracy": 0.5, "at": 2}
    assert ck.rebuild_index(str(tmp_path / "nothing")) is None


# --------------------------------------------------------------------------- a damaged latest checkpoint


def _truncate(path, size=None):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2 if size is None else size)


def _flip(path):
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {
    "truncated data file": (lambda d: _truncate(glob.glob(os.path.join(d, "ckpt.data-*"))[0]),
                            r"IndexError: Read less bytes than requested"),
    "flipped bits": (lambda d: _flip(glob.glob(os.path.join(d, "ckpt.data-*"))[0]), r"Checksum does not match"),
    "truncated .index": (lambda d: _truncate(os.path.join(d, "ckpt.index")), r"not an sstable"),
    "empty .index": (lambda d: _truncate(os.path.join(d, "ckpt.index"), 0), r"ckpt.index is empty"),
    "deleted folder": (shutil.rmtree, r"its folder is missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_that_restores(tmp_path, kind):
    directory = tmp_path / "checkpoints"
    var = _three_checkpoints(directory)
    damage, reason = DAMAGE[kind]
    damage(str(directory / "ckpt-00000003"))
    before = _tree(directory)
    said = []
    manager = _manager(directory, var, log=said.append)
    var.assign([0.0, 0.0])
    restored = manager.restore(manager.latest())
    assert (restored.step, restored.state) == (2, {"best_accuracy": 0.5, "at": 2})
    np.testing.assert_array_equal(var.numpy(), [2.0, 2.0])
    assert len(said) == 1 and re.fullmatch(rf"warning: checkpoint ckpt-00000003 is damaged \(.*{reason}.*\); "
                                           r"resuming from ckpt-00000002", said[0]), said
    assert _tree(directory) == before  # nothing deleted
    # training goes on from step 2: the next saves are indexed, the damaged one is overwritten at 3
    manager.save(3, {"at": 3})
    assert ck.checkpoint_damage(str(directory / "ckpt-00000003" / "ckpt")) is None
    assert manager.latest().step == 3


def test_two_damaged_are_each_named(tmp_path):
    directory = tmp_path / "checkpoints"
    var = _three_checkpoints(directory)
    _truncate(glob.glob(str(directory / "ckpt-00000003" / "ckpt.data-*"))[0])
    shutil.rmtree(directory / "ckpt-00000002")
    said = []
    assert _manager(directory, var, log=said.append).restore().step == 1
    assert [line.split(" (")[0] for line in said] == ["warning: checkpoint ckpt-00000003 is damaged",
                                                      "warning: checkpoint ckpt-00000002 is damaged"]
    assert all(line.endswith("; resuming from ckpt-00000001") for line in said)


def test_none_restoring_is_one_error_and_nothing_is_deleted(tmp_path):
    directory = tmp_path / "checkpoints"
    var = _three_checkpoints(directory)
    for step in (1, 2, 3):
        _truncate(glob.glob(str(directory / f"ckpt-0000000{step}" / "ckpt.data-*"))[0])
    before = _tree(directory)
    manager = _manager(directory, var)
    with pytest.raises(UserError) as err:
        manager.restore()
    message = str(err.value)
    assert message.startswith(f"{directory}: no checkpoint restores (ckpt-00000003: IndexError: ")
    assert "ckpt-00000001: IndexError" in message and "\n" not in message
    assert message.endswith("nothing was deleted; best-00000002 still loads for eval and export. "
                            "To start over, use another --run-dir")
    assert "--fresh" not in message and _tree(directory) == before


def test_a_changed_model_is_refused_at_once_not_skipped(tmp_path):
    directory = tmp_path / "checkpoints"
    _three_checkpoints(directory)
    other = tf.Variable([0.0, 0.0, 0.0])  # another shape: the checkpoint reads whole but does not fit
    with pytest.raises(UserError, match=r"ckpt-00000003: cannot resume from this checkpoint \(ValueError: .*\); "
                                        r"did the model or optimizer config change\?"):
        _manager(directory, other).restore()


def test_loading_weights_of_a_damaged_checkpoint_is_one_error(tmp_path):
    """What eval and export read (`load_weights`): a damaged file is an error line, not a traceback."""
    directory = tmp_path / "checkpoints"
    model = tf.Module()
    model.v = tf.Variable([1.0, 2.0])
    ck.CheckpointManager(str(directory), tf.train.Checkpoint(model=model)).save(1)
    assert ck.load_weights(model, str(tmp_path)) == 1
    _truncate(glob.glob(str(directory / "ckpt-00000001" / "ckpt.data-*"))[0])
    with pytest.raises(UserError, match=r"ckpt-00000001: checkpoint is damaged \(IndexError: Read less bytes"):
        ck.load_weights(model, str(tmp_path))


# --------------------------------------------------------------------------- write failures


def test_a_failed_write_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    atomic.write_text(path, "old")

    def full(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: cannot write: No space left on device$"):
        atomic.atomic_write(path, full)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.yaml"]

    def bug(tmp):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        atomic.atomic_write(path, bug)


def test_a_failed_index_write_removes_the_new_checkpoint(tmp_path, monkeypatch):
    """Disk full between the checkpoint's rename and its index: the old index and checkpoints stand."""
    directory = tmp_path / "checkpoints"
    var = _three_checkpoints(directory)
    before, index = _tree(directory), (directory / ck.INDEX).read_text()

    def full(path, *args, **kwargs):
        raise UserError(f"{path}: cannot write: No space left on device")

    monkeypatch.setattr(atomic, "write_json", full)
    with pytest.raises(UserError, match="checkpoint.json: cannot write"):
        _manager(directory, var).save(4, {"at": 4})
    assert _tree(directory) == before and (directory / ck.INDEX).read_text() == index


def test_full_disk_keeps_the_previous_checkpoint_and_its_index(small_disk):
    mnt, _ = small_disk
    directory = mnt / "checkpoints"
    var = tf.Variable(np.ones(100_000, dtype=np.float32))  # 400 KB: one fits in 640 KiB, two do not
    manager = _manager(directory, var)
    manager.save(1, {"at": 1})
    before = _tree(directory)
    index = (directory / ck.INDEX).read_text()
    var.assign(np.full(100_000, 2.0, dtype=np.float32))
    with pytest.raises(UserError, match=rf"^{re.escape(str(directory))}/ckpt-00000002: cannot write: "
                                        r"No space left on device$"):
        manager.save(2, {"at": 2})
    assert _tree(directory) == before and (directory / ck.INDEX).read_text() == index  # no temporary left
    # the same for any atomic write: a 300 KB file on the now almost full disk
    atomic.write_text(mnt / "config.yaml", "old")
    with pytest.raises(UserError, match=r"config.yaml: cannot write: No space left on device$"):
        atomic.write_bytes(mnt / "config.yaml", b"x" * 300_000)
    assert (mnt / "config.yaml").read_text() == "old"
    assert sorted(os.listdir(mnt)) == ["checkpoints", "config.yaml"]
    restored = _manager(directory, var).restore()
    assert restored.step == 1 and float(var.numpy()[0]) == 1.0


def test_read_only_folder_is_one_error_per_writer(small_disk):
    mnt, read_only = small_disk
    directory = mnt / "checkpoints"
    var = tf.Variable([1.0])
    manager = _manager(directory, var)
    manager.save(1)
    read_only()
    with pytest.raises(UserError, match=r"ckpt-00000002: cannot write: Read-only file system$"):
        manager.save(2)
    with pytest.raises(UserError, match=r"model.keras: cannot write: Read-only file system$"):
        atomic.atomic_write(str(mnt / "model.keras"), lambda tmp: None)
    from mobilenet_embed.runlock import RunLock

    with pytest.raises(UserError, match=rf"^{re.escape(str(mnt))}/.lock: cannot write: Read-only file system$"):
        RunLock(str(mnt)).acquire()
    assert manager.latest().step == 1


# --------------------------------------------------------------------------- through `mbembed train`


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One tiny finished training run (checkpoints at steps 1 and 2), copied by each test."""
    from mobilenet_embed.cli import main

    run = str(tmp_path_factory.mktemp("base") / "run")
    result = CliRunner().invoke(main, ["train", *_sets(), "--run-dir", run])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["checkpoint.json", "ckpt-00000001",
                                                                     "ckpt-00000002"]
    return run


def _train(run, copy_of=None):
    from mobilenet_embed.cli import main

    if copy_of:
        shutil.copytree(copy_of, run)
    return CliRunner().invoke(main, ["train", *_sets(), "--run-dir", run])


def test_train_resumes_from_the_folders_when_the_index_is_deleted(base_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(base_run, run)
    os.unlink(os.path.join(run, "checkpoints", ck.INDEX))
    result = _train(run)  # (before: "from scratch", ckpt-1 and ckpt-2 overwritten)
    assert result.exit_code == 0, result.output
    assert re.search(r"note: \S+/checkpoints/checkpoint.json is missing: rebuilt the index from the checkpoint "
                     r"folders \(latest ckpt-00000002, no best, 2 ckpt folder\(s\) kept\)", result.output)
    assert f"resuming {run} from step 2" in result.output and "from scratch" not in result.output
    assert "already at step 2 of 2" in result.output
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["checkpoint.json", "ckpt-00000001",
                                                                     "ckpt-00000002"]


def test_train_skips_a_damaged_latest_checkpoint(base_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(base_run, run)
    _truncate(glob.glob(os.path.join(run, "checkpoints", "ckpt-00000002", "ckpt.data-*"))[0])
    result = _train(run)
    assert result.exit_code == 0, result.output
    assert ("warning: checkpoint ckpt-00000002 is damaged (IndexError: Read less bytes than requested); "
            "resuming from ckpt-00000001") in result.output
    assert f"resuming {run} from step 1" in result.output and "Traceback" not in result.output
    assert "training finished at step 2" in result.output
    assert ck.checkpoint_damage(os.path.join(run, "checkpoints", "ckpt-00000002", "ckpt")) is None  # rewritten


def test_train_with_no_checkpoint_restoring_exits_2_and_deletes_nothing(base_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(base_run, run)
    for folder in ("ckpt-00000001", "ckpt-00000002"):
        _truncate(os.path.join(run, "checkpoints", folder, "ckpt.index"))
    before = _tree(os.path.join(run, "checkpoints"))
    result = _train(run)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {run}/checkpoints: no checkpoint restores "
                                                     "(ckpt-00000002: ")
    assert _tree(os.path.join(run, "checkpoints")) == before


def test_train_on_a_full_disk_says_which_file_and_keeps_the_last(base_run, small_disk):
    """Resumed at its last step, the run rewrites model.keras, which no longer fits."""
    mnt, _ = small_disk
    subprocess.run(["umount", "-l", str(mnt)], check=True, capture_output=True, timeout=30)
    used = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(base_run) for f in files)
    size_kb = (used + os.path.getsize(os.path.join(base_run, "model.keras")) // 2) // 1024
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], check=True,
                   capture_output=True, timeout=30)
    run = str(mnt / "run")
    shutil.copytree(base_run, run)
    index = open(os.path.join(run, "checkpoints", ck.INDEX), encoding="utf-8").read()
    result = _train(run)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {run}/model.keras: cannot write: No space left on device"], result.output
    assert "Traceback" not in result.output
    assert open(os.path.join(run, "checkpoints", ck.INDEX), encoding="utf-8").read() == index
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["checkpoint.json", "ckpt-00000001",
                                                                     "ckpt-00000002"]
    assert not [p for p in _tree(run) if os.path.basename(p).startswith((".tmp-", "ckpt-tmp-", ".old-"))]
