"""The benchmark scripts still run (their --quick smoke runs on tiny models): they import the package's API, which
moves; quality.py had failed before any work since a refactor moved load_recipe. The slower --quick runs (e2e,
target, qat, factorize: 0.5-3 min each) are left to the benchmarks themselves."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, args, expect", [
    ("quality.py", ["--quick", "--peers", "none"], "digits-cnn W8A8 within 0.3 accuracy points"),
    ("kernel_speed.py", ["--quick", "--clock", "cpu"], "int4 g128"),
])
def test_quick_run(tmp_path, script, args, expect):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # (and conftest's MODELPRESS_TUNE=0: no timing, no tune cache)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert expect in r.stdout
