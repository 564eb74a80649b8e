"""scripts/identification_figures.sh: finds `mbembed` in .venv without an activated environment,
and fails in one line when there is none."""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "identification_figures.sh")


def _checkout(tmp_path) -> str:
    """A bare checkout beside ../shared/data/lfw, as the script expects to be run from."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "lfw" / "images_deepfunneled").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts")
    return str(repo)


def _run(repo: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MBEMBED"}
    env["PATH"] = "/usr/bin:/bin"  # no mbembed here
    out = str(tmp_path / "out")
    return subprocess.run([shutil.which("bash"), "scripts/identification_figures.sh", "runs/x", out],
                          capture_output=True, text=True, env=env, cwd=repo)


def test_no_mbembed_is_one_line_error(tmp_path):
    proc = _run(_checkout(tmp_path), tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mbembed" in lines[0] and "MBEMBED" in lines[0]


def test_uses_checkout_venv_when_path_lacks_mbembed(tmp_path):
    repo = _checkout(tmp_path)
    fake = os.path.join(repo, ".venv", "bin", "mbembed")
    os.makedirs(os.path.dirname(fake))
    calls = tmp_path / "calls.txt"
    with open(fake, "w", encoding="utf-8") as fh:
        fh.write(f'#!/bin/sh\necho "$@" >> {calls}\nexit 3\n')
    os.chmod(fake, 0o755)
    proc = _run(repo, tmp_path)
    assert proc.returncode != 0  # the fake command fails; the script stops there
    assert calls.read_text().startswith("eval --config configs/lfw.yaml --checkpoint runs/x")
