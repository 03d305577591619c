"""The VM lane's image cache (tests/vm/vm.py): a build evicts only images
unused for KEEP_DAYS, never another branch's image in use or being built."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vm"))
import vm  # noqa: E402


def image_dir(cache, key, age_days=None):
    path = cache / key
    path.mkdir()
    if age_days is not None:
        (path / "ready").write_text("built\n")
        old = time.time() - age_days * 86400
        os.utime(path / "ready", (old, old))
    return path


def test_a_build_keeps_other_keys_images_until_unused_for_a_week(tmp_path, monkeypatch):
    monkeypatch.setattr(vm, "CACHE", str(tmp_path))
    mine = image_dir(tmp_path, "aaaa", 30)
    recent = image_dir(tmp_path, "bbbb", 1)          # another branch's, in use this week
    stale = image_dir(tmp_path, "cccc", vm.KEEP_DAYS + 1)
    building = image_dir(tmp_path, "dddd.tmp")       # another run building its image
    half = image_dir(tmp_path, "eeee")               # no "ready" yet: being built
    vm.evict("aaaa", sys.stderr)
    assert mine.exists() and recent.exists() and building.exists() and half.exists()
    assert not stale.exists()


def test_an_image_locked_by_another_run_is_not_evicted(tmp_path, monkeypatch):
    import fcntl
    monkeypatch.setattr(vm, "CACHE", str(tmp_path))
    stale = image_dir(tmp_path, "cccc", vm.KEEP_DAYS + 1)
    with open(str(stale) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        vm.evict("aaaa", sys.stderr)
        assert stale.exists()
