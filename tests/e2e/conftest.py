"""End-to-end fixtures: skip without root/wireguard-go, unless CI requires them."""
import contextlib
import os
import subprocess
import sys
import types

import pytest

from lab import ROOT, Lab, build_pyz, have_lab_tools, start_network, stop_group

BARE = ["/usr/bin/python3", "-S", "-I"] if os.path.exists("/usr/bin/python3") \
    else [sys.executable, "-S", "-I"]


def pytest_collection_modifyitems(config, items):
    # The VM lane's tests last, the quick benchmarks' before them: they wait
    # for what runs beside the rest.
    items.sort(key=lambda item: (is_vm_lane(item), is_bench(item)))
    ok, reason = have_lab_tools()
    if ok:
        return
    if os.environ.get("INNERNET_E2E_REQUIRED"):
        raise pytest.UsageError(f"end-to-end tests are required but cannot run: {reason}")
    for item in items:
        if "e2e" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))


def build_deb_once(config):
    """The .deb built from this checkout, once a session."""
    if getattr(config, "_innernet_deb", None) is None:
        from .packaging import build_deb
        config._innernet_deb = build_deb(config._tmp_path_factory)
    return config._innernet_deb


@pytest.fixture(scope="session")
def deb(pytestconfig):
    """The .deb built from this checkout (once a run: the packaging tests and
    the VM lane both install it)."""
    return build_deb_once(pytestconfig)


# The VM lane (tests/e2e/test_vm.py) keeps one core busy for about ten
# minutes with its guest under TCG, so it runs beside the rest of the session
# rather than after it: once collection has selected any of its tests (and
# only then: `-k other` starts nothing) and the host can run it, the
# .pyz and .deb are built and tests/vm/lane.py starts in the background in a
# process group of its own, writing into a share under the session's basetemp.
# test_vm.py's tests run last and wait (bounded) for it; the group is killed
# at the session's end, however it ends.
LANE = os.path.join(ROOT, "tests", "vm", "lane.py")


def is_vm_lane(item):
    return os.path.basename(str(item.fspath)) == "test_vm.py"


def is_bench(item):
    return os.path.basename(str(item.fspath)) == "test_bench_quick.py" and "/e2e/" in \
        str(item.fspath)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any(map(is_bench, session.items)) and have_lab_tools()[0]:
        from .benches import start_benches
        try:
            start_benches(session.config, build_pyz(session.config))
        except Exception:
            pass                # the same happens again in the test, and is reported there
    if not any(map(is_vm_lane, session.items)):
        return
    sys.path.insert(0, os.path.dirname(LANE))
    import vm
    if not vm.can_run()[0]:
        return                  # test_vm.py's fixture skips or fails, saying why
    try:
        start_vm_lane(session.config)
    except (Exception, pytest.skip.Exception, pytest.fail.Exception):
        pass                    # the same happens again in the fixture, and is reported there


def start_vm_lane(config):
    """tests/vm/lane.py running (started once a session); its handle: proc,
    share (where it leaves its results), log (its output)."""
    lane = getattr(config, "_innernet_vm_lane", None)
    if lane is not None:
        return lane
    pyz, deb = build_pyz(config), build_deb_once(config)
    share = str(config._tmp_path_factory.mktemp("vmshare"))
    log = os.path.join(share, "lane.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, LANE, share, pyz, deb],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    lane = config._innernet_vm_lane = types.SimpleNamespace(proc=proc, share=share, log=log)
    config.add_cleanup(lambda: stop_vm_lane(lane))
    return lane


def stop_vm_lane(lane):
    """End the lane's process group (its qemu included) if it still runs."""
    stop_group(lane.proc)


def debian_python_with_deps():
    """/usr/bin/python3 when Debian's python3-nacl and python3-pyroute2 are there."""
    import subprocess
    if not os.path.exists("/usr/bin/python3"):
        return None
    r = subprocess.run(["/usr/bin/python3", "-c", "import nacl.bindings, pyroute2.iproute"],
                       capture_output=True)
    return "/usr/bin/python3" if r.returncode == 0 else None


@contextlib.contextmanager
def network_world(pyz, cidrs, env=None, **kw):
    """A lab running the built .pyz with a server host 'srv' and its network: a
    namespace with lab, srv, net, serve (None with serve=False), db, hosts, ips.
    ``env``: variables every innernet command of the lab runs with."""
    lab = Lab(innernet_cmd=(["env"] + [f"{k}={v}" for k, v in env.items()] if env else [])
              + BARE + [pyz])
    w = types.SimpleNamespace(lab=lab, hosts={}, ips={})
    try:
        w.srv, w.net, w.serve = start_network(lab, cidrs, **kw)
        w.db = w.srv.path("server", "lib", f"{w.net}.db")
        yield w
    finally:
        lab.close()
