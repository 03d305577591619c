"""The demo (tests/demo.sh, README's "Try it") builds innernet.pyz, shows the
network working and removes every file it made, the .pyz included (issue 31)."""
import os
import subprocess
import sys

import pytest

from lab import ROOT

pytestmark = pytest.mark.netns


def test_the_demo_shows_the_network_and_leaves_no_file_behind(tmp_path):
    tmp = tmp_path / "tmp"       # the demo's temporary directories go here (TMPDIR)
    tmp.mkdir()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "demo.py")],
                       env=dict(os.environ, TMPDIR=str(tmp)), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(peers talk directly)" in r.stdout and "demo finished" in r.stdout
    assert os.listdir(tmp) == []
