"""Building the .deb from this checkout, and the shell helpers around it: what
tests/e2e/test_package.py and the VM lane (through conftest.py's deb fixture)
share."""
import glob
import os
import shutil
import subprocess

import pytest

from lab import ROOT

MIRROR = os.environ.get("INNERNET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TOOLS = ("debootstrap", "dpkg-buildpackage", "chroot", "lintian")


def need_tools():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        if os.environ.get("INNERNET_E2E_REQUIRED"):
            pytest.fail(f"packaging tests are required but {', '.join(missing)} are missing")
        pytest.skip(f"needs {', '.join(missing)}")


def sh(argv, timeout=900, check=True, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode:
        raise AssertionError(f"{argv} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def build_deb(tmp_path_factory):
    """Build the .deb from this checkout's files (tests/e2e/conftest.py's deb
    fixture, which this module and the VM lane share); its path."""
    need_tools()
    build = tmp_path_factory.mktemp("debbuild")
    src = build / "innernet-0.1.0"
    files = sh(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)) and not f.startswith("bench/results"):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    sh(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    (path,) = glob.glob(str(build / "innernet_*_all.deb"))
    return path
