"""The VM lane (issue 30): kernel WireGuard and the systemd units, for real,
in a Debian bookworm guest booted by qemu (TCG, no network device).

tests/vm/vm.py builds and caches the guest image; tests/vm/lane.py runs the
lane (started by tests/e2e/conftest.py in the background when the session
has collected this module: these tests run last and wait for it, so the
guest's core works beside the rest of the suite). The guest gets this
checkout's tests, the built innernet.pyz and the .deb over a virtio-9p share,
runs them from a copy on its own disk, and leaves its results on the share.
Two boots in one qemu, of one disk (an overlay of the cached image, so the
second boot finds what the first left):
  1. the kernel tests (tests/vm/guest_kernel.py, guest_fastpath.py) then the
     units' first half (tests/vm/guest_units.py), and beside them (the
     other vCPU) the tests/e2e selection lane.E2E, unchanged on kernel
     devices (`--backend auto` picks the kernel there); then
     `systemctl reboot`;
  2. after the reboot, the units' second half, which only looks: server and
     peers back by themselves, traffic, the timer's fetch.
"""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from lab import ROOT
from .conftest import start_vm_lane, stop_vm_lane

sys.path.insert(0, os.path.join(ROOT, "tests", "vm"))
import lane  # noqa: E402
import vm  # noqa: E402
from lane import read  # noqa: E402

pytestmark = pytest.mark.netns


def required():
    return bool(os.environ.get("INNERNET_E2E_REQUIRED"))


def junit_counts(share, name):
    """{outcome: [test ids]} of a guest run's JUnit file."""
    out = {"passed": [], "failed": [], "skipped": []}
    try:
        root = ET.parse(os.path.join(share, name)).getroot()
    except (OSError, ET.ParseError):
        return out
    for case in root.iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out["failed" if kinds & {"failure", "error"} else
            "skipped" if "skipped" in kinds else "passed"].append(tid)
    return out


@pytest.fixture(scope="module")
def guest(pytestconfig, pyz, deb):
    ok, reason = vm.can_run()
    if not ok:
        if required():
            pytest.fail(f"the VM lane is required but cannot run: {reason}")
        pytest.skip(reason)
    # Started in the background when the session collected this module
    # (tests/e2e/conftest.py); here only if that could not be done then.
    run = start_vm_lane(pytestconfig)
    try:
        run.proc.wait(lane.TOTAL_BUDGET)
    except subprocess.TimeoutExpired:
        stop_vm_lane(run)
        pytest.fail(f"the VM lane outlasted {lane.TOTAL_BUDGET} s\n--- {run.log} (tail) ---\n"
                    f"{read(run.share, 'lane.log')[-6000:]}")
    try:
        with open(os.path.join(run.share, "lane.json")) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"error": f"it ended ({run.proc.returncode}) without its results", "times": {}}
    if result["error"]:
        raise RuntimeError(f"the VM lane stopped short: {result['error']}\n--- {run.log} "
                           f"(tail) ---\n{read(run.share, 'lane.log')[-6000:]}")
    g = type("Guest", (), {})()
    g.share, g.times = run.share, result["times"]
    print("VM lane: " + ", ".join(f"{k} {v:.0f} s" for k, v in g.times.items())
          + "; in the guest (its uptime at each step, s): "
          + read(g.share, "times").strip().replace("\n", ", "))
    yield g


def outcome(g, part):
    rc, log = read(g.share, f"{part}.rc").strip(), read(g.share, f"{part}.log")
    res = junit_counts(g.share, f"{part}.xml")
    detail = (f"\n--- {part}.log (tail) ---\n{log[-6000:]}\n--- console (tail) ---\n"
              f"{read(g.share, 'console.log')[-3000:]}\n--- lane.log (tail) ---\n"
              f"{read(g.share, 'lane.log')[-2000:]}")
    return rc, res, detail


def test_kernel_backend_tests_pass_in_the_guest(guest):
    rc, res, detail = outcome(guest, "kernel")
    assert rc == "0" and res["passed"] and not res["failed"], detail
    print(f"{len(res['passed'])} passed in the guest on kernel WireGuard, "
          f"{len(res['skipped'])} skipped: {res['skipped']}")
    for line in read(guest.share, "kernel.log").splitlines():
        if "BENCH " in line:
            print(line[line.index("BENCH "):])


def test_end_to_end_tests_pass_on_kernel_devices(guest):
    rc, res, detail = outcome(guest, "e2e")
    assert rc == "0" and res["passed"] and not res["failed"], detail
    print(f"tests/e2e on kernel WireGuard in the guest: {len(res['passed'])} passed, "
          f"{len(res['skipped'])} skipped: {res['skipped']}")


def test_more_end_to_end_tests_pass_on_kernel_devices(guest):
    """lane.MORE, after the reboot: two runs, side by side, of more of tests/e2e."""
    runs = lane.more_runs()
    if not runs:
        pytest.skip("INNERNET_VM_MORE names none")
    passed = skipped = 0
    for part in ("more1", "more2")[:len(runs)]:
        rc, res, detail = outcome(guest, part)
        assert rc == "0" and res["passed"] and not res["failed"], detail
        passed, skipped = passed + len(res["passed"]), skipped + len(res["skipped"])
    print(f"more of tests/e2e on kernel WireGuard in the guest: {passed} passed, "
          f"{skipped} skipped")


def test_units_bring_everything_back_after_a_real_reboot(guest):
    rc, res, detail = outcome(guest, "units1")
    assert rc == "0" and res["passed"] and not res["failed"], detail
    assert os.path.exists(os.path.join(guest.share, "rebooted")), detail
    rc, res, detail = outcome(guest, "units2")
    assert rc == "0" and res["passed"] and not res["failed"], detail
    print(next((line for line in read(guest.share, "units2.log").splitlines()
                if line.startswith("after the reboot")), ""))
