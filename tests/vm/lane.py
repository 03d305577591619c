#!/usr/bin/env python3
"""The VM lane's run (issue 30), as one process: tests/e2e/test_vm.py asserts
on what it leaves in SHARE; tests/e2e/conftest.py starts it in the background
when the session has collected test_vm.py, so that the guest (one core busy
under TCG) runs beside the rest of the suite rather than after it.

    tests/vm/lane.py SHARE PYZ DEB

Finds or builds the cached image (vm.py), gives the guest this checkout's
tests, PYZ and DEB in SHARE, runs one qemu in which the guest boots, tests,
reboots and tests again, and writes SHARE/lane.json last: {"times": {part: s},
"error": null or the reason the lane stopped short}. Its own output is
whatever the starter points stdout at (SHARE/lane.log from conftest.py).
Every qemu it runs stays in its process group: killing that group ends it all.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import vm  # noqa: E402

# What runs in the guest in the first boot: two pytest runs side by side,
# one per vCPU (qemu 7.2 runs an x86_64 guest's vCPUs on host threads of
# their own): the kernel tests then the units' first half, and beside them
# the tests/e2e selection. tests/vm/guest_kernel.py covers the mesh with the
# access rules, an association over the API, `down`/`up`, rotate-key and a
# mixed kernel and wireguard-go network; the .deb's units need the second
# boot. Side by side, the lane's test time is the longer of the two (one
# after the other, 2026-12-07 in CI: 90 s and 97 s, 240 s in all); on a
# host with no core to spare each run goes more slowly, hence the lab's
# waits scaled (INNERNET_E2E_TIMEOUT_SCALE below) and the budgets.
KERNEL = ["tests/vm/guest_kernel.py", "tests/vm/guest_fastpath.py"]
# End-to-end tests of the suite run unchanged on kernel devices (`--backend
# auto` picks the kernel in the guest): issue 30's kernel features that
# guest_kernel.py does not cover itself. INNERNET_VM_SELECTION replaces
# them (paths or node ids under tests/), e.g. with all of tests/e2e/test_mesh.py.
E2E = ["tests/e2e/test_nat.py::test_port_preserving_nats_connect_directly",
       "tests/e2e/test_nat.py::test_symmetric_nats_go_through_the_relay_within_the_rules",
       "tests/e2e/test_names_routes.py::"
       "test_routes_reach_the_lan_once_approved_and_only_for_allowed_peers",
       "tests/e2e/test_names_routes.py::test_exit_node_carries_traffic_and_down_restores_routing"]
# And after the reboot, once the units' second half has looked (the lane's
# core, above, is done by then): more of tests/e2e on kernel devices, in two
# pytest runs side by side: every command (test_commands.py), the mesh and
# its access rules, the lifecycle (rotation under traffic, deletion), a
# server outage, a static peer, one peer's limits. 37 tests; measured
# 2026-12-08, beside a unit test run on the host: 175 s and 342 s side by
# side with test_mesh.py in the second run, so it moved to the first.
# INNERNET_VM_MORE replaces them ("-" for none), each run's paths
# separated by "|".
# Not test_lifecycle.py's test_a_new_key_without_a_valid_proof_is_refused_by_every_client:
# in one of four runs in the loaded guest (2026-12-08) its server kept
# answering "not modified" for 80 s after the test wrote the database beside
# serve, a failure not understood yet, so not in CI until it is.
LIFECYCLE = ["tests/e2e/test_lifecycle.py::" + t for t in (
    "test_delete_reaches_daemon_peers_and_quarantines_the_address",
    "test_the_client_floor_keeps_a_reused_address_from_the_new_key",
    "test_an_expired_invitation_is_reissued_and_the_old_one_refused",
    "test_rotate_key_under_live_traffic_to_two_peers",
    "test_a_peer_away_across_a_rotation_and_a_deletion_takes_the_next_peer_there")]
MORE = (LIFECYCLE + ["tests/e2e/test_outage.py", "tests/e2e/test_static.py",
                     "tests/e2e/test_mesh.py"],
        ["tests/e2e/test_commands.py", "tests/e2e/test_one_peer.py"])
MORE_BUDGET = 1200
GUEST_BUDGET = 600             # s for the kernel tests (their waits end sooner)
# s for the tests/e2e selection: one run alone took 354 s at load 4-6 and over
# 600 at 8-10; beside the kernel tests, more. INNERNET_VM_E2E_BUDGET sets it for
# a larger INNERNET_VM_SELECTION run by hand.
E2E_BUDGET = int(os.environ.get("INNERNET_VM_E2E_BUDGET") or 1200)

# The payload runs at every boot of one qemu process (the guest reboots
# inside it, its disk an overlay of the cached image that lasts as long as
# qemu: no copy of the image, and the second boot finds what the first
# left). Stage 1: the kernel tests and the units' first half, beside them the
# tests/e2e selection, then `systemctl reboot` (the image's runner does it when the
# payload leaves SHARE/reboot); stage 2, after the reboot: the units'
# second half, then the two runs of MORE side by side, then poweroff. Tests run from the guest's own disk: a module
# imported over 9p costs an open() round trip to the host per module.
PAYLOAD = """#!/bin/sh
S=/mnt/share L=/root/lane
up() {{ cut -d' ' -f1 /proc/uptime; }}
export INNERNET_PYZ=$L/innernet.pyz INNERNET_DEB=$L/innernet.deb INNERNET_E2E_REQUIRED=1
export INNERNET_E2E_TIMEOUT_SCALE=4    # the lab's waits, under emulation, two runs at once
run() {{   # NAME BUDGET PYTEST-ARGS...: one pytest run, its log, JUnit file and status
  # (SIGINT at the budget: pytest still writes its report and JUnit file)
  n=$1 b=$2 t=$(up); shift 2
  INNERNET_LAB_TIMES=$S/$n.cmds timeout -s INT -k 30 $b python3 -m pytest -p no:cacheprovider \\
    -q -rfEs -s --durations=0 --durations-min=1 --junitxml=$S/$n.xml "$@" > $S/$n.log 2>&1
  echo $? > $S/$n.rc
  echo "$n $t $(up)" >> $S/times
}}
if [ ! -e $S/stage1 ]; then
  touch $S/stage1
  echo "payload $(up)" > $S/times
  rm -rf $L && mkdir -p $L && cp -a $S/src $S/innernet.pyz $S/innernet.deb $L/ || exit 1
  cd $L/src || exit 1
  echo "copied $(up)" >> $S/times
  ( run kernel {budget} {kernel}; run units1 300 -k before_reboot tests/vm/guest_units.py ) &
  run e2e {e2e_budget} {e2e}
  wait
  echo "end $(up)" >> $S/times
  [ "$(cat $S/units1.rc)" = 0 ] && touch $S/reboot
elif [ ! -e $S/stage2 ]; then
  touch $S/stage2 $S/rebooted
  echo "payload2 $(up)" >> $S/times
  cd $L/src || exit 1
  run units2 300 -k after_reboot tests/vm/guest_units.py
  echo "core $(up)" >> $S/times
  [ -n "{more1}" ] && ( run more1 {more_budget} {more1} ) &
  [ -n "{more2}" ] && run more2 {more_budget} {more2}
  wait
fi
exit 0
"""


def more_runs():
    """The selections of the runs after the reboot: MORE, or INNERNET_VM_MORE's."""
    more = os.environ.get("INNERNET_VM_MORE")
    return [" ".join(r) for r in (MORE if more is None else [
        r.split() for r in more.split("|")]) if r and r != ["-"]][:2]


# Bounded: the image build (vm.py: 900 s), the copies, the boots.
BOOT_BUDGET = max(GUEST_BUDGET + 300, E2E_BUDGET) + 300 + MORE_BUDGET + 240
TOTAL_BUDGET = 900 + 300 + BOOT_BUDGET + 120


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


def give(share, pyz, deb):
    """The guest's inputs on the share: the checkout's files, the .pyz, the .deb."""
    src = os.path.join(share, "src")
    for f in checkout_files():
        os.makedirs(os.path.join(src, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(src, f))
    shutil.copy(pyz, os.path.join(share, "innernet.pyz"))
    shutil.copy(deb, os.path.join(share, "innernet.deb"))


def run(share, pyz, deb):
    """The whole lane; {"times": ..., "error": ...}, also written to SHARE/lane.json."""
    result = {"times": {}, "error": None}
    try:
        t0 = time.monotonic()
        folder = vm.image(log=sys.stdout)
        t1 = time.monotonic()
        result["times"]["image (cached or built)"] = t1 - t0
        give(share, pyz, deb)
        e2e = " ".join(os.environ.get("INNERNET_VM_SELECTION", "").split() or E2E)
        more = more_runs() + ["", ""]
        with open(os.path.join(share, "payload"), "w") as f:
            f.write(PAYLOAD.format(budget=GUEST_BUDGET, e2e_budget=E2E_BUDGET,
                                   kernel=" ".join(KERNEL), e2e=e2e, more_budget=MORE_BUDGET,
                                   more1=more[0], more2=more[1]))
        os.chmod(os.path.join(share, "payload"), 0o755)
        result["times"]["inputs to the share"] = time.monotonic() - t1
        rc, took = vm.boot(folder, share, timeout=BOOT_BUDGET, reboot=True)
        result["times"]["qemu (both boots)"] = took
        print(f"lane: qemu ran {took:.0f} s; the last payload's exit status {rc}", flush=True)
    except Exception:
        result["error"] = traceback.format_exc()
        print(result["error"], flush=True)
    with open(os.path.join(share, "lane.json.tmp"), "w") as f:
        json.dump(result, f)
    os.rename(os.path.join(share, "lane.json.tmp"), os.path.join(share, "lane.json"))
    return result


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(1 if run(*sys.argv[1:])["error"] else 0)
