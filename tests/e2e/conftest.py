"""End-to-end fixtures: skip without root/wireguard-go, unless CI requires them."""
import contextlib
import os
import sys
import types

import pytest

from lab import Lab, have_lab_tools, start_network

BARE = ["/usr/bin/python3", "-S", "-I"] if os.path.exists("/usr/bin/python3") \
    else [sys.executable, "-S", "-I"]


def pytest_collection_modifyitems(config, items):
    ok, reason = have_lab_tools()
    if ok:
        return
    if os.environ.get("INNERNET_E2E_REQUIRED"):
        raise pytest.UsageError(f"end-to-end tests are required but cannot run: {reason}")
    for item in items:
        if "e2e" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def deb(tmp_path_factory):
    """The .deb built from this checkout (once a run: the packaging tests and
    the VM lane both install it)."""
    from .packaging import build_deb
    return build_deb(tmp_path_factory)


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
