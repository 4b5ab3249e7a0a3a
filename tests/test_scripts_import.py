"""The benchmark and example scripts still import (they are not run by the suite, so a moved function breaks
them silently otherwise)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")])
BENCH_ONLY = {"hnswlib"}  # pyproject's `bench` extra


def test_there_are_scripts_to_check() -> None:
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_script_imports_without_running(script: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"_script_{script.parent.name}_{script.stem}", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # defines functions only: every script runs under `if __name__ == "__main__"`
    except ModuleNotFoundError as e:
        if e.name in BENCH_ONLY:  # the `bench` extra, not installed by the test command
            pytest.skip(f"{script.name} needs {e.name} (pip install -e '.[bench]')")
        raise
    assert callable(getattr(module, "main", None))


def test_the_gpu_check_script_parses_and_names_files_that_exist() -> None:
    script = ROOT / "benchmarks" / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = set(re.findall(r"(?:tests|benchmarks)/[\w/]+\.py", script.read_text()))
    assert "tests/test_cuda_paths.py" in named
    assert "benchmarks/gpu_throughput.py" in named
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert not missing, f"benchmarks/gpu_checks.sh names files that do not exist: {missing}"


_FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3: the device probe and the module checks succeed or fail fast; gpu_throughput.py fails
# for a source root whose path holds 'broken'.
case "$1" in
  -) cat >/dev/null; echo "device fake" ;;
  -c) exit 1 ;;
  *) echo "ran $1 with PYTHONPATH=$PYTHONPATH"; [[ "$1" != *broken* ]] ;;
esac
"""


def _run_gpu_checks(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PYTHONPATH": "/site"}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_gpu_check_bench_fails_when_any_run_fails_and_imports_each_roots_code_first(tmp_path: Path) -> None:
    good, broken = tmp_path / "good", tmp_path / "broken"
    good.mkdir()
    broken.mkdir()
    passed = _run_gpu_checks(tmp_path, "bench", str(good), "dense")
    assert passed.returncode == 0, passed.stderr
    log = (tmp_path / "out" / "bench.log").read_text()
    assert log.count(f"ran {good}/benchmarks/gpu_throughput.py with PYTHONPATH={good}/src:/site") == 2
    assert log.count(f"ran {ROOT}/benchmarks/gpu_throughput.py with PYTHONPATH={ROOT}/src:/site") == 2
    # A failing baseline fails the command (the loop used to return only the last run's status, the current one's).
    failed = _run_gpu_checks(tmp_path, "bench", str(broken), "dense")
    assert failed.returncode != 0
    # A mistyped baseline folder is named, not passed on as a row name.
    typo = _run_gpu_checks(tmp_path, "bench", str(tmp_path / "no-such-baseline"), "dense")
    assert typo.returncode == 2
    assert "no-such-baseline does not exist" in typo.stderr
