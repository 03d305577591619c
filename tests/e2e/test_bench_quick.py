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
                                   "traversal.py", "relay.py", "footprint.py", "cron_path.py"])
def test_namespace_benchmark_runs(bench, pyz):
    if bench == "cron_path.py" and not os.environ.get("INNERNET_COMPAT_REQUIRED") and \
            not os.access(os.path.join(os.environ.get("INNERNET_REFERENCE_DIR") or os.path.join(
                os.path.dirname(ROOT), "shared", "reference", "innernet-1.5.5"), "innernet"),
                os.X_OK):
        pytest.skip("innernet 1.5.5's binaries are not here (INNERNET_REFERENCE_DIR)")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", bench), "--quick"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, INNERNET_PYZ=pyz))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| " in r.stdout and ("ratio" in r.stdout or "vs full" in r.stdout)
    print(r.stdout)
