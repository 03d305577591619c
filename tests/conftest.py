import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "netns: needs root, network namespaces and wireguard-go")


@pytest.fixture(scope="session")
def pyz(pytestconfig):
    """innernet.pyz built from this checkout (lab.build_pyz)."""
    from lab import build_pyz
    return build_pyz(pytestconfig)


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
