"""The fast path of an unchanged cron `fetch` on a kernel device (issue 30),
measured in the VM lane's guest beside a wireguard-go device in the same run.

Not collected on the host (the name is not test_*). Which path ran is seen
in the record the full sync rewrites (`<iface>.fetch`), as in
tests/e2e/test_fast_fetch.py; the times are wall-clock times of the whole
command (`python3 -S -I innernet.pyz fetch IFACE`), under TCG emulation.
"""
import os
import statistics
import time

import pytest

from lab import clear_of_path_work, invite, record, settled

from e2e.conftest import network_world

pytestmark = pytest.mark.netns
RUNS = 3


@pytest.fixture(scope="module")
def world(pyz):
    with network_world(pyz, {"humans": "10.66.1.0/24"}) as w:
        for name, backend in (("kern", "kernel"), ("user", "userspace")):
            host = w.hosts[name] = w.lab.add_host(name)
            host.exec(host.innernet_argv("install", "--name", w.lab.ifname(name),
                                         "--no-write-hosts", invite(w.srv, w.net, name, "humans"),
                                         globals=["--backend", backend]))
        for name, host in w.hosts.items():
            host.innernet("fetch", w.lab.ifname(name), "--no-write-hosts")
        yield w


def timed_fetch(host, ifname, *extra):
    t0 = time.monotonic()
    host.innernet(*extra, "fetch", ifname, "--no-write-hosts")
    return time.monotonic() - t0


def test_unchanged_fetch_on_a_kernel_device_takes_the_fast_path(world):
    figures = {}
    for name, kind in (("kern", "kernel"), ("user", "wireguard-go")):
        host, ifname = world.hosts[name], world.lab.ifname(name)
        settled(host, ifname)
        fetch = lambda: timed_fetch(host, ifname)           # noqa: E731
        fetch()
        before = clear_of_path_work(host, ifname, fetch)
        fast = [fetch() for _ in range(RUNS)]
        assert record(host, ifname) == before, f"{kind}: an unchanged fetch took the full sync"
        full = [timed_fetch(host, ifname, "-v") for _ in range(RUNS)]   # -v: always full
        # ... and leaves no record to answer from
        assert not os.path.exists(host.path("client", "lib", f"{ifname}.fetch"))
        figures[kind] = (statistics.median(fast), statistics.median(full))
    line = "; ".join(f"{kind}: fast path {f:.2f} s, full sync {g:.2f} s"
                     for kind, (f, g) in figures.items())
    print(f"BENCH unchanged cron fetch, median of {RUNS} (guest, TCG): {line}")
