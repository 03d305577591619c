"""The test suite itself (issue 31): `pytest tests` as a user without root and
without the optional test packages (tests/requirements.txt beyond pytest)
collects every test and skips what needs them, with a reason, checked here as
`nobody` when the suite runs as root, with an import hook that hides those
packages from this very interpreter; and test modules share code through
helpers.py and lab.py, never by importing one another."""
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import ROOT

# The import names of tests/requirements.txt's optional packages.
OPTIONAL = ("hypothesis", "nacl", "pyroute2", "qrcode", "png", "pyzbar", "dns",
            "prometheus_client", "litestream")

WITHOUT = r"""
import importlib.abc, sys
HIDDEN = set(sys.argv[1].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def checkout():
    """A copy of the checkout any user may read (the real one may sit in root's
    home); removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="innernet-optional-")
    try:
        os.chmod(tmp, 0o755)
        for name in ("innernet.py", "build_zipapp.py", "README.md", "pyproject.toml"):
            shutil.copy(os.path.join(ROOT, name), tmp)
        shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(tmp, "tests"),
                        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        subprocess.run(["chmod", "-R", "a+rX", tmp], check=True)
        os.mkdir(os.path.join(tmp, "work"))
        os.chmod(os.path.join(tmp, "work"), 0o1777)     # HOME and --basetemp for nobody
        yield tmp
    finally:
        shutil.rmtree(tmp)


def run_pytest(checkout, *args, hide=OPTIONAL):
    """pytest on the copy, as `nobody` when we are root, with ``hide`` unimportable."""
    user = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("needs runuser (util-linux) to run as nobody")
        user = ["runuser", "-u", "nobody", "--"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               HOME=os.path.join(checkout, "work"))
    env.pop("INNERNET_E2E_REQUIRED", None)
    env.pop("INNERNET_COMPAT_REQUIRED", None)
    r = subprocess.run(user + [sys.executable, "-c", WITHOUT, ",".join(hide) or "-",
                               "-p", "no:cacheprovider", *args],
                       cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode and "Permission denied" in r.stderr and user:
        pytest.skip(f"nobody cannot run {sys.executable}: {r.stderr.strip()[-200:]}")
    return r


def collected(r):
    m = re.search(r"^(\d+) tests? collected", r.stdout, re.M)
    assert m, r.stdout[-3000:] + r.stderr[-3000:]
    return int(m.group(1))


def test_without_the_optional_packages_every_test_is_collected(checkout):
    bare = run_pytest(checkout, "tests", "--collect-only", "-q")
    assert bare.returncode == 0 and not re.search(r"ERROR collecting|\d+ errors? ", bare.stdout), \
        bare.stdout[-3000:] + bare.stderr[-3000:]
    full = run_pytest(checkout, "tests", "--collect-only", "-q", hide=())
    assert collected(bare) == collected(full) > 600


def test_tests_that_need_an_optional_package_are_skipped_with_its_name(checkout):
    r = run_pytest(checkout, "tests/test_dns.py", "tests/test_hostile.py",
                   "tests/test_ops.py::test_metrics_parse_and_move", "-rs", "-q",
                   "-k", "not idle_and_slow", f"--basetemp={checkout}/work/bt")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", r.stdout, re.M)
    assert skips and all(re.search(r"needs (dnspython|hypothesis|prometheus_client) ", s)
                         for s in skips), skips
    assert any("prometheus_client" in s for s in skips), skips
    assert re.search(r"\b\d+ passed", r.stdout), r.stdout[-2000:]


def test_test_modules_import_no_other_test_module():
    found = []
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{os.path.relpath(path, ROOT)} imports {n}" for n in names
                      if n.split(".")[-1].startswith("test_")]
    assert not found, found
