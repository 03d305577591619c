"""The namespace benchmarks, in their short form, against the built .pyz.

They print figures; nothing here asserts a time.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.netns


@pytest.mark.parametrize("bench", ["join.py", "propagation.py", "fetch_cost.py", "apply_one.py",
                                   "traversal.py", "relay.py", "footprint.py"])
def test_namespace_benchmark_runs(bench, pyz):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", bench), "--quick"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, INNERNET_PYZ=pyz))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| " in r.stdout and ("ratio" in r.stdout or "vs full" in r.stdout)
    print(r.stdout)
