"""Packaging (issue 5): the .deb, installed offline into a fresh Debian root;
the .pyz on Debian's own Pythons; the mesh test run with the installed commands.

Needs root, debootstrap, dpkg-buildpackage and Debian's mirror (the roots are
made fresh by debootstrap; the dependencies' .debs are fetched beforehand, and
every install and run happens in a network namespace with no network).
"""
import os
import shutil
import subprocess
import sys

import pytest

from lab import ROOT
from .packaging import MIRROR, need_tools, sh

pytestmark = pytest.mark.netns

@pytest.fixture(scope="module")
def offline_ns():
    name = f"inoff{os.getpid() % 100000}"
    sh(["ip", "netns", "add", name])
    sh(["ip", "-n", name, "link", "set", "lo", "up"])
    yield name
    sh(["ip", "netns", "del", name], check=False)


def offline(ns, root, *argv, check=True):
    """Run argv chrooted in ``root`` inside a namespace with no network at all."""
    return sh(["ip", "netns", "exec", ns, "chroot", root] + list(argv), check=check)


def debootstrap(tmp_path_factory, suite, include="python3"):
    root = tmp_path_factory.mktemp(f"root-{suite}")
    sh(["debootstrap", "--variant=minbase", f"--include={include}", suite, str(root), MIRROR],
       timeout=1200)
    return str(root)


@pytest.fixture(scope="module")
def bookworm(tmp_path_factory):
    need_tools()
    root = tmp_path_factory.mktemp("root-bookworm")
    sh(["debootstrap", "--variant=minbase", "bookworm", str(root), MIRROR], timeout=1200)
    # Fetch, while online, every .deb the offline installs will need.
    sh(["chroot", str(root), "apt-get", "install", "--download-only", "-y", "-q",
        "--no-install-recommends", "python3", "python3-nacl", "python3-pyroute2", "systemd",
        "man-db"],
       timeout=1200)
    yield str(root)
    shutil.rmtree(root, ignore_errors=True)


def test_lintian_has_no_errors_or_warnings(deb):
    r = sh(["lintian", "--fail-on", "error,warning", deb], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_deb_holds_every_part(deb):
    """The contents list: program, units and timer, man pages, completions."""
    listed = sh(["dpkg-deb", "-c", deb]).stdout.splitlines()
    paths = {line.split()[5].lstrip(".") for line in listed}
    units = {"innernet@.service", "innernet-server@.service", "innernet-fetch@.service",
             "innernet-fetch@.timer", "innernet.target"}
    unit_dirs = {p.rsplit("/", 1)[0] for p in paths if p.rsplit("/", 1)[-1] in units}
    assert len(unit_dirs) == 1 and unit_dirs <= {"/lib/systemd/system", "/usr/lib/systemd/system"}
    assert {d + "/" + u for d in unit_dirs for u in units} <= paths
    assert {"/usr/bin/innernet", "/usr/bin/innernet-server",
            "/usr/share/innernet/innernet.py", "/usr/share/innernet/innernet_fast.py",
            "/usr/share/man/man8/innernet.8.gz", "/usr/share/man/man8/innernet-server.8.gz",
            "/usr/share/bash-completion/completions/innernet",
            "/usr/share/bash-completion/completions/innernet-server",
            "/usr/share/zsh/vendor-completions/_innernet",
            "/usr/share/zsh/vendor-completions/_innernet-server",
            "/usr/share/fish/vendor_completions.d/innernet.fish",
            "/usr/share/fish/vendor_completions.d/innernet-server.fish"} <= paths
    link = next(line for line in listed if line.split()[5] == "./usr/bin/innernet-server")
    assert link.startswith("l") and link.endswith("-> innernet")


def test_pyz_runs_on_a_fresh_root_with_only_debian_python(bookworm, offline_ns, pyz):
    offline(offline_ns, bookworm, "apt-get", "install", "--no-download", "-y", "-q",
            "--no-install-recommends", "python3")
    shutil.copy(pyz, os.path.join(bookworm, "tmp", "innernet.pyz"))
    r = offline(offline_ns, bookworm, "python3", "-c", "import nacl", check=False)
    assert r.returncode != 0                        # nothing but Debian's python3
    run_pyz_server_verbs(offline_ns, bookworm)


def run_pyz_server_verbs(ns, root):
    pyz = ["python3", "/tmp/innernet.pyz"]
    assert offline(ns, root, *pyz, "--help").stdout.startswith("usage: innernet")
    base = pyz + ["-c", "/tmp/t/etc", "-d", "/tmp/t/lib", "server"]
    offline(ns, root, *base, "new", "--network-name", "n", "--network-cidr", "10.7.0.0/16",
            "--external-endpoint", "198.18.0.1:51820", "--listen-port", "51820")
    offline(ns, root, *base, "add-cidr", "n", "--name", "c", "--cidr", "10.7.1.0/24",
            "--parent", "n", "--yes")
    offline(ns, root, *base, "add-peer", "n", "--name", "p", "--cidr", "c", "--auto-ip",
            "--admin", "false", "--invite-expires", "1d", "--save-config", "/tmp/t/p.toml",
            "--yes")
    assert os.path.exists(os.path.join(root, "tmp/t/p.toml"))


def test_deb_installs_offline_and_works(bookworm, offline_ns, deb):
    shutil.copy(deb, os.path.join(bookworm, "tmp", "innernet.deb"))
    # The dependencies from the local cache (no download), then the package.
    offline(offline_ns, bookworm, "apt-get", "install", "--no-download", "-y", "-q",
            "--no-install-recommends", "python3-nacl", "python3-pyroute2", "systemd", "man-db")
    offline(offline_ns, bookworm, "dpkg", "-i", "/tmp/innernet.deb")
    assert offline(offline_ns, bookworm, "innernet", "--version").stdout.startswith("innernet.py")
    out = offline(offline_ns, bookworm, "innernet-server", "--help").stdout
    assert out.startswith("usage: innernet-server") and "serve" in out
    units = ["innernet@evilcorp.service", "innernet-server@evilcorp.service",
             "innernet-fetch@evilcorp.service", "innernet-fetch@evilcorp.timer"]
    r = offline(offline_ns, bookworm, "systemd-analyze", "verify", *units, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # systemd-analyze verify also checked each unit's Documentation=man: page.
    assert offline(offline_ns, bookworm, "man", "-w", "innernet-server").stdout.strip() \
        .endswith("innernet-server.8.gz")
    for path in ("usr/share/man/man8/innernet.8.gz", "usr/share/man/man8/innernet-server.8.gz",
                 "usr/share/bash-completion/completions/innernet",
                 "usr/share/zsh/vendor-completions/_innernet",
                 "usr/share/fish/vendor_completions.d/innernet.fish",
                 "usr/share/innernet/innernet_fast.py"):
        assert os.path.exists(os.path.join(bookworm, path)), path
    # byte-compiled at install, so a start (a cron fetch) reads bytecode
    cache = os.listdir(os.path.join(bookworm, "usr/share/innernet/__pycache__"))
    assert {c.split(".")[0] for c in cache} >= {"innernet", "innernet_fast"}, cache
    r = offline(offline_ns, bookworm, "innernet", "fetch", "nosuchnet", check=False)
    assert r.returncode != 0 and r.stderr.startswith("innernet: error:"), r.stderr


@pytest.mark.parametrize("suite,version", [("bullseye", "3.9"), ("trixie", "3.13")])
def test_pyz_on_other_debian_pythons(tmp_path_factory, offline_ns, pyz, suite, version):
    need_tools()
    root = debootstrap(tmp_path_factory, suite)
    try:
        shutil.copy(pyz, os.path.join(root, "tmp", "innernet.pyz"))
        out = offline(offline_ns, root, "python3", "--version").stdout
        assert out.startswith(f"Python {version}"), out
        run_pyz_server_verbs(offline_ns, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_mesh_with_the_installed_commands(deb):
    """Install the .deb on this host, run the mesh test with /usr/bin/innernet*."""
    if sh(["dpkg-query", "-W", "-f", "${Status}", "innernet"], check=False).stdout.startswith(
            "install ok"):
        pytest.skip("an innernet package is already installed on this host; not touching it")
    sh(["dpkg", "-i", deb])
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            os.path.join(ROOT, "tests", "e2e", "test_mesh.py")],
                           capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, INNERNET_E2E_CMD="/usr/bin/innernet",
                                    INNERNET_E2E_SERVER_CMD="/usr/bin/innernet-server"))
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        print(r.stdout.strip().splitlines()[-1])
    finally:
        sh(["dpkg", "--purge", "innernet"], check=False)
