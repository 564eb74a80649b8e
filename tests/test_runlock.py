"""One process per run directory: the lock file, its refusal, stale take-over and release."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from mobilenet_embed.errors import UserError
from mobilenet_embed.runlock import LOCK_NAME, RunLock

TINY = [
    "data.source=synthetic", "data.image_size=32", "data.synthetic_identities=8",
    "data.synthetic_images_per_identity=2", "data.val_identities=0", "model.alpha=0.25",
    "model.embedding_size=8", "train.identities_per_batch=2", "train.images_per_identity=2",
    "train.epochs=1", "train.log_every_steps=1", "train.checkpoint_every_steps=100000",
]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_naming_the_first(tmp_path):
    run_dir = str(tmp_path / "run")
    with RunLock(run_dir) as first:
        info = json.loads(open(os.path.join(run_dir, LOCK_NAME), encoding="utf-8").read())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"^{re.escape(run_dir)} is in use by pid {os.getpid()} on host "
                                            rf"{re.escape(socket.gethostname())} since \d{{4}}-"):
            RunLock(run_dir).acquire()
        assert first.info == info
    assert not os.path.exists(os.path.join(run_dir, LOCK_NAME))


def test_lock_is_released_on_exceptions(tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(RuntimeError):
        with RunLock(run_dir):
            raise RuntimeError("boom")
    RunLock(run_dir).acquire().release()


def test_stale_lock_of_a_dead_pid_is_taken_over_and_said_so(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = _dead_pid()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                 "started": "2026-01-01T00:00:00+00:00"}))
    said = []
    with RunLock(str(run_dir), log=said.append) as lock:
        assert lock.info["pid"] == os.getpid()
    assert said == [f"note: {run_dir}: took over the lock of pid {pid} on host {socket.gethostname()} "
                    "since 2026-01-01T00:00:00+00:00 (that process is no longer running)"]


def test_lock_of_another_host_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": "x"}))
    with pytest.raises(UserError, match="in use by pid .* on host elsewhere since x; if that process is gone, "
                                        "remove"):
        RunLock(str(run_dir)).acquire()


def test_two_trainers_second_refuses_then_stale_lock_is_taken_over(tmp_path):
    """A training process holds runs/x; a second trainer stops with one line naming it; after the
    first is SIGKILLed, its stale lock is taken over. (That `train` releases its lock on exit is
    shown by tests/test_run_config.py, which trains twice on one run directory in one process.)"""
    from mobilenet_embed.cli import main

    run_dir = str(tmp_path / "run")
    log_path = tmp_path / "first.log"
    args = [a for item in TINY + ["train.steps_per_epoch=100000"] for a in ("--set", item)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    with open(log_path, "w", encoding="utf-8") as log:
        first = subprocess.Popen([sys.executable, "-c", "from mobilenet_embed.cli import run; run()", "train",
                                  *args, "--run-dir", run_dir], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        lock_file = os.path.join(run_dir, LOCK_NAME)
        while not os.path.exists(lock_file) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, log_path.read_text()[-2000:]
        # (one step: without the lock this second trainer would just run and exit 0)
        result = CliRunner().invoke(main, ["train", *args, "--set", "train.steps_per_epoch=1", "--run-dir", run_dir])
        assert result.exit_code == 2
        assert re.fullmatch(rf"Error: {re.escape(run_dir)} is in use by pid {first.pid} on host \S+ since \S+\n",
                            result.output), result.output
    finally:
        first.kill()
        first.wait()
    assert os.path.isfile(os.path.join(run_dir, LOCK_NAME))  # SIGKILL leaves it behind
    said = []
    with RunLock(run_dir, log=said.append):  # what the next `train` on run_dir does first
        pass
    assert len(said) == 1 and f"took over the lock of pid {first.pid}" in said[0]
    assert not os.path.exists(os.path.join(run_dir, LOCK_NAME))


def test_unreadable_lock_is_refused_with_what_to_do(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text("")
    with pytest.raises(UserError, match=r"unreadable: remove it if no run is using it"):
        RunLock(str(run_dir)).acquire()


@pytest.mark.parametrize("command", [["export"], ["export", "embeddings", "--data", "synthetic"]])
def test_second_export_into_one_folder_is_refused_naming_the_first(tmp_path, command):
    from mobilenet_embed.cli import main

    out = str(tmp_path / "out")
    with RunLock(out):  # what a first export holds while it runs
        result = CliRunner().invoke(main, [*command, "--checkpoint", str(tmp_path / "none"), "--out", out])
    assert result.exit_code == 2
    assert re.fullmatch(rf"Error: {re.escape(out)} is in use by pid {os.getpid()} on host "
                        rf"{re.escape(socket.gethostname())} since \S+\n", result.output), result.output


def test_export_takes_over_a_dead_exports_lock_and_releases_it(tmp_path):
    from mobilenet_embed.cli import main

    out = tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "none"), "--out", str(out)])
    assert result.exit_code == 2  # the checkpoint is missing: the export itself fails after the lock
    assert f"note: {out}: took over the lock of pid {pid} on host" in result.output
    assert f"Error: {tmp_path / 'none'}: checkpoint not found" in result.output
    assert os.listdir(out) == []  # released; the folder existed before, so it stays


def test_a_folder_the_lock_made_is_removed_when_left_empty(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(UserError):
        with RunLock(str(out)):
            raise UserError("the command failed before writing anything")
    assert not out.exists() and (tmp_path / "new").is_dir()
    with RunLock(str(out)):
        (out / "kept.txt").write_text("x")
    assert os.listdir(out) == ["kept.txt"]
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(UserError, match=rf"^{re.escape(str(file))}: exists and is not a folder$"):
        RunLock(str(file)).acquire()
