"""The namespace benchmarks, in their short form, against the built .pyz.

They print figures; nothing here asserts a time. Timed by nothing and
independent of the rest (each makes its own lab), they run one after another
in the background beside the rest of the session (tests/e2e/conftest.py
starts them once collection has selected any of these tests), as the VM lane
does; these tests run near the end and wait, bounded, for their results.
"""
import os
import time

import pytest

from .benches import BENCHES, BUDGET, have_reference, start_benches, stop_benches

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("bench", BENCHES)
def test_namespace_benchmark_runs(bench, pyz, pytestconfig):
    if bench == "cron_path.py" and not have_reference():
        pytest.skip("innernet 1.5.5's binaries are not here (INNERNET_REFERENCE_DIR)")
    run = start_benches(pytestconfig, pyz)
    rc_file, out_file = (os.path.join(run.share, f"{bench}.{x}") for x in ("rc", "out"))
    while not os.path.exists(rc_file):
        if run.proc.poll() is not None and not os.path.exists(rc_file):
            pytest.fail(f"the benchmarks stopped before {bench} ended ({run.proc.returncode})")
        if time.monotonic() - run.started > BUDGET:
            stop_benches(run)
            pytest.fail(f"the benchmarks outlasted {BUDGET} s")
        time.sleep(1)           # polls a file another process writes; bounded above
    with open(out_file) as f:
        out = f.read()
    with open(rc_file) as f:
        assert f.read().strip() == "0", out
    assert "| " in out and ("ratio" in out or "vs full" in out), out
    print(out)
