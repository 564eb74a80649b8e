"""scripts/gpu_check.sh: valid bash, and a clear refusal where there is no NVIDIA GPU."""

import os
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.sh")


def test_gpu_check_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: gpu_check.sh: no NVIDIA GPU here (nvidia-smi not found or lists no GPU)"
    assert not (tmp_path / "out").exists()
