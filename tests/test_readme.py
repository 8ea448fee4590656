"""README's example runs as printed, and CI runs README's install-and-test block."""

import pathlib
import re
import subprocess
import sys

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


def test_ci_runs_the_readme_block():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ci:begin" in ci and "README.md" in ci
    block = _block("ci")
    assert "pip install --no-build-isolation" in block and "--require-ext" in block
    assert re.search(r"^python -m pytest .*tests", block, re.M)


def test_readme_avalanche_example_is_valid_python():
    """The Avalanche example runs in the integration environment (it trains 5 tasks: run by hand, not in CI);
    here it must at least be Python that compiles and uses the integration's public names."""
    block = _block("avalanche")
    compile(block, "README.md:avalanche", "exec")
    assert "supsup_strategy" in block and "write_mnist_5k" in block
