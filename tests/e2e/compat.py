"""The compatibility lane: the real innernet 1.5.5 binaries in the lab.

They are found in $INNERNET_REFERENCE_DIR, else in
``../shared/reference/innernet-1.5.5`` beside the repository (where CI puts
them). Without them the lane's tests skip, saying so; with
INNERNET_COMPAT_REQUIRED set (tests/run.sh sets it when it finds them as
root) they fail instead.

Facts about driving innernet 1.5.5 on wireguard-go: ``--backend userspace``
goes before the verb and, for ``serve``, after it too (serve's own flag
overrides the global one); its ``fetch`` and ``show`` look for a
``/var/run/wireguard/<iface>.name`` file that wireguard-go on Linux does not
write, so the helpers write it (and remove exactly those they wrote); its
``install`` waits about 5 s before switching keys.
"""
import os

import pytest

from lab import ROOT, Lab, wait_for

VERSION = "1.5.5"
WG_RUN = "/var/run/wireguard"


def reference_dir():
    """Where innernet's binaries are looked for."""
    return os.environ.get("INNERNET_REFERENCE_DIR") or \
        os.path.join(os.path.dirname(ROOT), "shared", "reference", f"innernet-{VERSION}")


def reference_binaries():
    """(innernet, innernet-server) paths, or (None, why not)."""
    d = reference_dir()
    client, server = os.path.join(d, "innernet"), os.path.join(d, "innernet-server")
    for path in (client, server):
        if not os.access(path, os.X_OK):
            return None, f"innernet {VERSION} binaries not found: no executable {path} " \
                         f"(set INNERNET_REFERENCE_DIR)"
    return (client, server), None


def require_reference():
    """The binaries, or a skip (a failure where INNERNET_COMPAT_REQUIRED is set)."""
    found, why = reference_binaries()
    if found is None:
        if os.environ.get("INNERNET_COMPAT_REQUIRED"):
            pytest.fail(f"the compatibility lane is required but cannot run: {why}",
                        pytrace=False)
        pytest.skip(why)
    return found


class CompatLab(Lab):
    """A lab whose hosts run our .pyz or innernet's binaries, host by host."""

    def __init__(self, pyz_cmd, *, innernet_server=False):
        (self.ref_client, self.ref_server) = require_reference()
        super().__init__(innernet_cmd=pyz_cmd,
                         server_cmd=[self.ref_server] if innernet_server else None)
        self.innernet_server = innernet_server
        self.name_files = []

    def add_innernet_host(self, name, underlay=None):
        """A host whose client is innernet 1.5.5 (on wireguard-go)."""
        host = self.add_host(name, underlay, innernet_cmd=[self.ref_client])
        host.is_reference = True
        for d in ("etc", "lib"):          # innernet makes neither
            os.makedirs(host.path("client", d), mode=0o700)
        return host

    def add_host(self, name, underlay=None, **kw):
        host = super().add_host(name, underlay, **kw)
        host.is_reference = False
        return host

    def mark_up(self, iface):
        """innernet's fetch/show find a userspace interface by its .name file."""
        path = os.path.join(WG_RUN, f"{iface}.name")
        with open(path, "w") as f:
            f.write(iface + "\n")
        if path not in self.name_files:
            self.name_files.append(path)

    def close(self):
        try:
            super().close()
        finally:
            for path in self.name_files:
                if os.path.exists(path):
                    os.unlink(path)


def userspace(host, server=False):
    """The global options a host's program needs on wireguard-go."""
    ref = host.lab.innernet_server if server else host.is_reference
    return ["--backend", "userspace"] if ref else []


def cli(host, *args, check=True, timeout=90):
    """A client verb on ``host`` (ours or innernet's), global options first."""
    return host.exec(host.innernet_argv(*args, globals=userspace(host)), check=check,
                     timeout=timeout)


def server_cli(srv, *args, check=True, timeout=60):
    """A server verb (ours or innernet-server)."""
    return srv.exec(srv.innernet_argv(*args, server=True, globals=userspace(srv, True)),
                    check=check, timeout=timeout)


def start_serve(srv, net, env=None):
    """`serve NET` (ours or innernet-server's) in the background; returns once it
    answers on its API port. innernet-server logs at RUST_LOG (``env``)."""
    log = f"serve-{len(srv.procs)}.log"
    argv = srv.innernet_argv("serve", net, server=True, globals=userspace(srv, True))
    if srv.lab.innernet_server:
        argv += ["--backend", "userspace"]
        if env:
            argv = ["env"] + [f"{k}={v}" for k, v in env.items()] + argv
    else:
        argv += ["--no-write-hosts"]
    proc = srv.spawn(argv, log)

    def listening():
        assert proc.poll() is None, srv.log(log)
        rows = [line.split() for line in
                srv.exec(["cat", "/proc/net/tcp"]).stdout.splitlines()[1:]]
        return any(r[1].endswith(":CA6C") and r[3] == "0A" for r in rows)   # 51820, LISTEN
    wait_for(listening, 30, "the server to listen")
    srv.serve_log = log
    return proc


def new_network(srv, net, network="10.66.0.0/16"):
    """`new` on the server; innernet-server makes its directories one level deep."""
    os.makedirs(srv.path("server"), mode=0o700, exist_ok=True)
    server_cli(srv, "new", "--network-name", net, "--network-cidr", network,
               "--external-endpoint", f"{srv.underlay}:51820", "--listen-port", "51820")


def add_peer_args(net, name, cidr, path, *, admin="false", ip=None, expires="30d"):
    return ["add-peer", net, "--name", name, "--cidr", cidr, "--admin", admin,
            *(["--ip", ip] if ip else ["--auto-ip"]), "--save-config", path,
            "--invite-expires", expires, "--yes"]


def install(host, invitation, iface, *extra, check=True):
    """`install` on ``host`` (innernet's takes ~5 s); marks it up for innernet."""
    r = cli(host, "install", "--name", iface, "--no-write-hosts", *extra, invitation,
            check=check)
    if host.is_reference and r.returncode == 0:
        host.lab.mark_up(iface)
    return r


def fetch(host, iface, check=True):
    """One sync (innernet's `fetch`, needing its .name file; our `fetch`)."""
    if host.is_reference:
        host.lab.mark_up(iface)
    return cli(host, "fetch", iface, "--no-write-hosts", check=check)
