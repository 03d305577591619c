"""The quick namespace benchmarks in the background (tests/e2e/test_bench_quick.py):
started by tests/e2e/conftest.py once collection selected any of those tests."""
import os
import subprocess
import sys
import time
import types

from lab import ROOT, stop_group

BENCHES = ["join.py", "propagation.py", "fetch_cost.py", "apply_one.py", "traversal.py",
           "relay.py", "footprint.py", "cron_path.py"]
BUDGET = 1800                   # s, for all of them, from their start


def have_reference():
    return bool(os.environ.get("INNERNET_COMPAT_REQUIRED")) or os.access(os.path.join(
        os.environ.get("INNERNET_REFERENCE_DIR") or os.path.join(
            os.path.dirname(ROOT), "shared", "reference", "innernet-1.5.5"), "innernet"),
        os.X_OK)


def start_benches(config, pyz):
    """The benchmarks running one after another in a process group of their
    own (once a session), each leaving <share>/<bench>.out and .rc."""
    run = getattr(config, "_innernet_benches", None)
    if run is not None:
        return run
    share = str(config._tmp_path_factory.mktemp("benches"))
    script = "; ".join(f'{sys.executable} {os.path.join(ROOT, "bench", b)} --quick '
                       f'> {share}/{b}.out 2>&1; echo $? > {share}/{b}.rc.tmp; '
                       f'mv {share}/{b}.rc.tmp {share}/{b}.rc'
                       for b in BENCHES if b != "cron_path.py" or have_reference())
    proc = subprocess.Popen(["bash", "-c", script], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, INNERNET_PYZ=pyz), start_new_session=True)
    run = config._innernet_benches = types.SimpleNamespace(proc=proc, share=share,
                                                           started=time.monotonic())
    config.add_cleanup(lambda: stop_benches(run))
    return run


def stop_benches(run):
    stop_group(run.proc)
