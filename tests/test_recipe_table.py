"""scripts/recipe_table.py: finds `mbembed` without an activated environment, and fails in one line."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "recipe_table.py")


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True, env=env, cwd=ROOT)


def _fake_run(tmp_path) -> str:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    return str(run)


def test_finds_mbembed_beside_python_when_path_lacks_it(tmp_path):
    """With PATH empty the command is the `mbembed` beside this Python: it runs and reports the run."""
    env = {k: v for k, v in os.environ.items() if k != "MBEMBED"}
    env["PATH"] = str(tmp_path / "empty")
    proc = _run([_fake_run(tmp_path), "--out", str(tmp_path / "t.json")], env)
    assert proc.returncode != 0
    assert "No such file" not in proc.stderr and "Traceback" not in proc.stderr
    assert os.path.join(os.path.dirname(sys.executable), "mbembed") in proc.stdout


def test_missing_command_is_one_line_error(tmp_path):
    env = dict(os.environ, MBEMBED=str(tmp_path / "no-such-mbembed"))
    proc = _run([_fake_run(tmp_path), "--out", str(tmp_path / "t.json")], env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-mbembed" in lines[0] and "MBEMBED" in lines[0]
