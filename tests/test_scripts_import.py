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
