"""README's example runs as printed, and CI runs README's install-and-test block."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest
from _require import missing

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(name: str) -> str:
    m = re.search(rf"<!-- {name}:begin -->\s*```\w*\n(.*?)```\s*<!-- {name}:end -->", README, re.S)
    assert m, f"README.md has no {name}:begin/{name}:end block"
    return m.group(1)


def test_readme_example_runs_and_learns_both_tasks():
    proc = subprocess.run([sys.executable, "-c", _block("example")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    accs = [float(a) for a in re.findall(r"accuracy ([0-9.]+)", proc.stdout)]
    assert len(accs) == 2 and min(accs) >= 0.9, proc.stdout


def test_ci_runs_the_readme_blocks_two_lines():
    """README's set-up is two commands: one installs everything and runs the main job, one runs the tests;
    CI runs that block verbatim."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ci:begin" in ci and "README.md" in ci
    install, tests = _block("ci").strip().split("\n")
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")
    assert 'pip install --no-build-isolation -e ".[test]"' in install and install.endswith("&& supsup-fast run")
    assert tests == "SUPSUP_FAST_STRICT_TESTS=1 python -m pytest -q tests bench --benchmark-disable"


@pytest.mark.slow
def test_readme_avalanche_example_runs(tmp_path):
    """The Avalanche example as printed (5 PermutedMNIST-5k experiences, GG), in a fresh folder: it trains,
    evaluates every experience seen so far, and leaves its CSV and TensorBoard logs."""
    for module in ("avalanche", "tensorboard"):
        if importlib.util.find_spec(module) is None:
            missing(f"{module} is not installed (README's set-up installs avalanche-lib)")
    block = _block("avalanche")
    assert "supsup_strategy" in block and "write_mnist_5k" in block
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stream_acc = r"Top1_Acc_Stream/eval_phase/test_stream(?:/Task\d+)? = ([0-9.]+)"
    stream = [float(a) for a in re.findall(stream_acc, proc.stdout)]
    assert stream and min(stream[-5:]) > 0.5, proc.stdout[-3000:]
    assert (tmp_path / "avalanche_logs" / "eval_results.csv").is_file()
    assert any((tmp_path / "tb_logs").iterdir())


def test_ci_stops_at_a_failing_command_inside_a_line(tmp_path):
    """`set -e` alone would go on after `false && ...` (a failure inside an && list): .ci/run must stop there,
    and keep the shell's state (an activated venv) from one line to the next."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text((ROOT / ".ci" / "run").read_text())
    block = "X=kept && echo first $X\necho second $X\nfalse && echo never\necho ran-$((1 + 1))\n"
    (tmp_path / "README.md").write_text(f"<!-- ci:begin -->\n```bash\n{block}```\n<!-- ci:end -->\n")
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "first kept\nsecond kept\n" in proc.stdout and "ran-2" not in proc.stdout, proc.stdout
