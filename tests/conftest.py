"""Shared test settings and fixtures: quiet TensorFlow, no GPU; a small tmpfs for write failures."""

import os
import subprocess

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def small_disk(tmp_path):
    """A 640 KiB tmpfs mounted for the test (root only); yields (folder, remount read-only)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")

    def read_only():
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True, timeout=30)

    try:
        yield mnt, read_only
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
