#!/usr/bin/env python3
"""The VM test lane (issue 30): a Debian bookworm guest with the kernel's
WireGuard module and systemd, booted under qemu (TCG, no network device).

    tests/vm/vm.py image                  build (or find) the cached image; print its folder
    tests/vm/vm.py run SHARE [--disk D]   boot it once with SHARE as the guest's /mnt/share

The image is built by build-image.sh from the package list ``packages`` and
cached in $INNERNET_VM_CACHE (default /var/cache/innernet-vm) under a hash of
both files and the mirror, so it is rebuilt exactly when what goes into it
changes. Images of other keys (other checkouts, branches) are kept until
unused for KEEP_DAYS; a build, and a use, holds a lock on its key. A boot runs /mnt/share/payload inside the guest and leaves its exit
status in SHARE/rc, its output in SHARE/payload.log and the serial console in
SHARE/console.log. tests/vm/lane.py drives it for tests/e2e/test_vm.py.
"""
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("INNERNET_VM_CACHE", "/var/cache/innernet-vm")
QEMU = "qemu-system-x86_64"
KEEP_DAYS = 7       # an image of another key unused this long is evicted by a build


def mirror():
    """Debian's mirror as apt is configured to use it (debootstrap needs the URL)."""
    if os.environ.get("INNERNET_DEBIAN_MIRROR"):
        return os.environ["INNERNET_DEBIAN_MIRROR"]
    paths = ["/etc/apt/sources.list"]
    d = "/etc/apt/sources.list.d"
    if os.path.isdir(d):
        paths += [os.path.join(d, f) for f in sorted(os.listdir(d))
                  if f.endswith((".list", ".sources"))]
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["deb"] or words[:1] == ["URIs:"]:
                for w in words[1:]:
                    if w.startswith("http") and "security" not in w:
                        return w.rstrip("/")
    return "http://deb.debian.org/debian"


def image_key():
    h = hashlib.sha256()
    for name in ("packages", "build-image.sh"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(mirror().encode())
    return h.hexdigest()[:16]


def image(log=sys.stderr):
    """The cached image's folder (vmlinuz, initrd.img, rootfs.ext4), built if
    missing; its ``ready`` file's mtime is its last use."""
    folder = os.path.join(CACHE, image_key())
    os.makedirs(CACHE, exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one build of a key at a time
        if not os.path.exists(os.path.join(folder, "ready")):
            build(folder, log)
            evict(os.path.basename(folder), log)
        os.utime(os.path.join(folder, "ready"))
    return folder


def build(folder, log):
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    r = subprocess.run(["sh", os.path.join(HERE, "build-image.sh"), mirror(), tmp],
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"image build failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-3000:]}")
    with open(os.path.join(tmp, "ready"), "w") as f:
        f.write(f"built in {time.monotonic() - t0:.0f} s\n")
    # build-image.sh's "step N s" lines: where a cold run's time went
    print("".join(line + "\n" for line in r.stdout.splitlines() if line.startswith("step ")),
          end="", file=log)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    print(f"vm: image built in {time.monotonic() - t0:.0f} s: {folder}", file=log)


def evict(keep, log):
    """Remove the images of other keys unused for KEEP_DAYS (another branch's
    image is that branch's cache, not a stale one), each under its key's lock,
    never one being built or used."""
    for other in sorted(os.listdir(CACHE)):
        path = os.path.join(CACHE, other)
        if other == keep or "." in other or not os.path.isdir(path):
            continue
        try:
            unused = time.time() - os.stat(os.path.join(path, "ready")).st_mtime
        except OSError:
            continue                # being built, or not ours: left alone
        if unused < KEEP_DAYS * 86400:
            continue
        with open(path + ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)
        print(f"vm: evicted {path}, unused for {unused / 86400:.0f} days", file=log)


# The guest kernel's clock: its TSCs look unsynchronised under TCG, so it
# falls back to the HPET, and every clock read is an emulated MMIO access
# (time.monotonic() 5.8 us a call; 1.0 us on the TSC). No mitigations against
# side channels between guest processes that are all the test's. fastboot
# and noresume: the initrd skips fsck and waiting for a resume device.
KERNEL_ARGS = "tsc=reliable clocksource=tsc mitigations=off fastboot noresume"


def qemu_argv(folder, share, disk=None, reboot=False):
    """One qemu: TCG, 2 CPUs, 1 GB, no NIC, the share over virtio-9p. Without
    ``disk`` the cached image is used with snapshot=on (it stays unchanged;
    the guest's writes last as long as qemu). A reboot of the guest ends qemu
    unless ``reboot``: then the guest boots again in the same qemu, on the
    same disk, and only a poweroff ends it."""
    drive = f"file={disk},format=raw,if=virtio" if disk else \
        f"file={os.path.join(folder, 'rootfs.ext4')},format=raw,if=virtio,snapshot=on"
    return [QEMU, "-accel", "tcg", "-cpu", "qemu64", "-smp", "2", "-m", "1024",
            "-display", "none", "-monitor", "none", "-serial", "stdio",
            *([] if reboot else ["-no-reboot"]), "-nic", "none",
            "-kernel", os.path.join(folder, "vmlinuz"),
            "-initrd", os.path.join(folder, "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 panic=1 quiet " + KERNEL_ARGS,
            "-drive", drive,
            "-virtfs", f"local,path={share},mount_tag=share,security_model=none"]


def boot(folder, share, *, disk=None, timeout=600, reboot=False):
    """Run qemu until the guest powers off (or reboots, unless ``reboot``);
    (the last payload's exit status or None, seconds). The console goes to
    SHARE/console.log."""
    for f in ("rc", "payload.log"):
        with_path = os.path.join(share, f)
        if os.path.exists(with_path):
            os.unlink(with_path)
    t0 = time.monotonic()
    # qemu is our child in our process group (not under timeout(1), which
    # makes a group of its own): whoever kills this process's group ends it.
    with open(os.path.join(share, "console.log"), "ab") as console:
        p = subprocess.Popen(qemu_argv(folder, share, disk, reboot), stdin=subprocess.DEVNULL,
                             stdout=console, stderr=subprocess.STDOUT)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        finally:
            if p.poll() is None:     # we are being stopped: qemu goes with us
                p.kill()
                p.wait()
    took = time.monotonic() - t0
    try:
        with open(os.path.join(share, "rc")) as f:
            return int(f.read().strip() or -1), took
    except (OSError, ValueError):
        return None, took


def can_run():
    """(ok, reason): what the lane needs on the host."""
    if os.geteuid() != 0:
        return False, "needs root (debootstrap, the image cache)"
    for tool in (QEMU, "debootstrap", "mkfs.ext4"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return False, f"needs {tool} (apt-get install qemu-system-x86 debootstrap)"
    return True, ""


if __name__ == "__main__":
    if sys.argv[1:2] == ["image"]:
        print(image())
    elif sys.argv[1:2] == ["run"] and len(sys.argv) >= 3:
        disk = sys.argv[sys.argv.index("--disk") + 1] if "--disk" in sys.argv else None
        rc, took = boot(image(), os.path.abspath(sys.argv[2]), disk=disk)
        print(f"vm: payload exit status {rc}, boot took {took:.0f} s")
        sys.exit(0 if rc == 0 else 1)
    else:
        sys.exit(__doc__)
