import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "netns: needs root, network namespaces and wireguard-go")


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """innernet.pyz built from this checkout, as a user builds it (INNERNET_PYZ:
    one built already, as the VM lane's guest gets it from the host)."""
    if os.environ.get("INNERNET_PYZ"):
        return os.environ["INNERNET_PYZ"]
    out = tmp_path_factory.mktemp("build") / "innernet.pyz"
    subprocess.run([sys.executable, os.path.join(ROOT, "build_zipapp.py"), "-o", str(out)],
                   check=True, capture_output=True)
    return str(out)


# Counts that reliability and security tests report (requests fuzzed, faults
# injected, writes verified, ...); printed at the end of every run and quoted
# in README.md.
COUNTS = {}


@pytest.fixture
def co(tmp_path):
    """innernet's server test fixture (its server/src/test.rs) as a Coordinator on a
    real SQLite file."""
    from helpers import make_coordinator
    return make_coordinator(tmp_path)


@pytest.fixture(scope="session")
def counts():
    return COUNTS


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        terminalreporter.section("reliability and security counts")
        for name in sorted(COUNTS):
            terminalreporter.write_line(f"{name}: {COUNTS[name]}")
