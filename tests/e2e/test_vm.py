"""The VM lane (issue 30): kernel WireGuard and the systemd units, for real,
in a Debian bookworm guest booted by qemu (TCG, no network device).

tests/vm/vm.py builds and caches the guest image. The guest gets this
checkout's tests, the built innernet.pyz and the .deb over a virtio-9p share
and leaves its results there. Two boots of one disk (a copy of the cached
image, so the second boot finds what the first left):
  1. the kernel tests (tests/vm/guest_kernel.py and the tests/e2e selection
     below, where `--backend auto` picks the kernel), then the units' first
     half (tests/vm/guest_units.py), which ends with `systemctl reboot`;
  2. after the reboot, the units' second half, which only looks: server and
     peers back by themselves, traffic, the timer's fetch.
"""
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from lab import ROOT

sys.path.insert(0, os.path.join(ROOT, "tests", "vm"))
import vm  # noqa: E402

pytestmark = pytest.mark.netns

# What runs in the guest on kernel devices in the first boot.
# INNERNET_VM_SELECTION adds tests (paths or node ids under tests/) to it,
# e.g. tests/e2e tests, which `--backend auto` runs on the kernel there.
SELECTION = ["tests/vm/guest_kernel.py", "tests/vm/guest_fastpath.py"]
GUEST_BUDGET = 420             # s for the guest's pytest runs in one boot

PAYLOAD_1 = """#!/bin/sh
S=/mnt/share
rm -rf /root/src && cp -a $S/src /root/src && cd /root/src || exit 1
export INNERNET_PYZ=$S/innernet.pyz INNERNET_DEB=$S/innernet.deb INNERNET_E2E_REQUIRED=1
export INNERNET_E2E_TIMEOUT_SCALE=3    # the lab's waits, under emulation
t0=$(date +%s)
timeout -k 10 {budget} python3 -m pytest -p no:cacheprovider -q -rfEs -s \\
  --junitxml=$S/kernel.xml {selection} > $S/kernel.log 2>&1
echo $? > $S/kernel.rc
t1=$(date +%s)
timeout -k 10 300 python3 -m pytest -p no:cacheprovider -q -rfEs -s -k before_reboot \\
  --junitxml=$S/units1.xml tests/vm/guest_units.py > $S/units1.log 2>&1
rc=$?
echo $rc > $S/units1.rc
echo "kernel tests $((t1 - t0)) s, units before the reboot $(($(date +%s) - t1)) s" > $S/times
[ $rc = 0 ] && touch $S/reboot
exit 0
"""

PAYLOAD_2 = """#!/bin/sh
S=/mnt/share
cd /root/src || exit 1
timeout -k 10 300 python3 -m pytest -p no:cacheprovider -q -rfEs -s -k after_reboot \\
  --junitxml=$S/units2.xml tests/vm/guest_units.py > $S/units2.log 2>&1
echo $? > $S/units2.rc
exit 0
"""


def required():
    return bool(os.environ.get("INNERNET_E2E_REQUIRED"))


def checkout_files():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if (f.startswith("tests/") or f in ("innernet.py",
                                                                  "build_zipapp.py"))
            and os.path.isfile(os.path.join(ROOT, f))]


def read(share, name):
    try:
        with open(os.path.join(share, name), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


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
def guest(tmp_path_factory, pyz, deb):
    ok, reason = vm.can_run()
    if not ok:
        if required():
            pytest.fail(f"the VM lane is required but cannot run: {reason}")
        pytest.skip(reason)
    t0 = time.monotonic()
    folder = vm.image(log=sys.stdout)
    built = time.monotonic() - t0
    share = str(tmp_path_factory.mktemp("vmshare"))
    src = os.path.join(share, "src")
    for f in checkout_files():
        os.makedirs(os.path.join(src, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(src, f))
    shutil.copy(pyz, os.path.join(share, "innernet.pyz"))
    shutil.copy(deb, os.path.join(share, "innernet.deb"))
    selection = " ".join(SELECTION + os.environ.get("INNERNET_VM_SELECTION", "").split())
    disk = os.path.join(str(tmp_path_factory.mktemp("vmdisk")), "rootfs.ext4")
    subprocess.run(["cp", "--sparse=always", os.path.join(folder, "rootfs.ext4"), disk],
                   check=True, timeout=300)
    g = type("Guest", (), {})()
    g.share, g.times = share, {"image (cached or built)": built}
    try:
        for n, payload in ((1, PAYLOAD_1.format(budget=GUEST_BUDGET, selection=selection)),
                           (2, PAYLOAD_2)):
            if n == 2 and not os.path.exists(os.path.join(share, "rebooted")):
                break
            with open(os.path.join(share, "payload"), "w") as f:
                f.write(payload)
            os.chmod(os.path.join(share, "payload"), 0o755)
            rc, took = vm.boot(folder, share, disk=disk, timeout=GUEST_BUDGET + 420)
            g.times[f"boot {n}"] = took
            if rc is None:
                break
            if n == 1 and read(share, "units1.rc").strip() == "0" and \
                    not os.path.exists(os.path.join(share, "reboot")):
                # the guest took the flag and rebooted (qemu -no-reboot ends there)
                open(os.path.join(share, "rebooted"), "w").close()
    finally:
        os.unlink(disk)
    print("VM lane: " + ", ".join(f"{k} {v:.0f} s" for k, v in g.times.items())
          + "; in the guest: " + read(share, "times").strip())
    yield g


def outcome(g, part):
    rc, log = read(g.share, f"{part}.rc").strip(), read(g.share, f"{part}.log")
    res = junit_counts(g.share, f"{part}.xml")
    detail = (f"\n--- {part}.log (tail) ---\n{log[-6000:]}\n--- console (tail) ---\n"
              f"{read(g.share, 'console.log')[-3000:]}")
    return rc, res, detail


def test_kernel_backend_tests_pass_in_the_guest(guest):
    rc, res, detail = outcome(guest, "kernel")
    assert rc == "0" and res["passed"] and not res["failed"], detail
    print(f"{len(res['passed'])} passed in the guest on kernel WireGuard, "
          f"{len(res['skipped'])} skipped: {res['skipped']}")
    for line in read(guest.share, "kernel.log").splitlines():
        if "BENCH " in line:
            print(line[line.index("BENCH "):])


def test_units_bring_everything_back_after_a_real_reboot(guest):
    rc, res, detail = outcome(guest, "units1")
    assert rc == "0" and res["passed"] and not res["failed"], detail
    assert os.path.exists(os.path.join(guest.share, "rebooted")), detail
    rc, res, detail = outcome(guest, "units2")
    assert rc == "0" and res["passed"] and not res["failed"], detail
    print(next((line for line in read(guest.share, "units2.log").splitlines()
                if line.startswith("after the reboot")), ""))
