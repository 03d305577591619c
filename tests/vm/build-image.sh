#!/bin/sh
# Build the VM test lane's guest image:  build-image.sh MIRROR OUTDIR
# A debootstrapped Debian bookworm root (tests/vm/packages) with systemd as
# init, booted by qemu with the kernel and initrd in OUTDIR (no bootloader).
# At the end of boot innernet-vm.service mounts the host's 9p share "share"
# on /mnt/share, runs /mnt/share/payload with its output in payload.log and
# its exit status in rc, then powers off (or reboots when the payload left
# /mnt/share/reboot; qemu runs with -no-reboot, so both end it).
# The image is cached by tests/vm/vm.py, keyed by this file and the package list.
set -eu
MIRROR=$1 OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
# The root is built in memory when there is room (dpkg syncs every file it
# unpacks; on tmpfs that costs nothing) and /dev/shm allows device files and
# programs (its postinst scripts use /dev/null), else beside the image.
if [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')" -gt 3000000 ] 2>/dev/null \
    && ! grep -qE '^[^ ]+ /dev/shm [^ ]+ [^ ]*(nodev|noexec)' /proc/mounts; then
  ROOT=$(mktemp -d /dev/shm/innernet-vm-root.XXXXXX) && chmod 755 "$ROOT"
else
  ROOT=$OUT/root
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
fi
trap 'rm -rf "$ROOT"' EXIT
PKGS=$(grep -v '^#' "$HERE/packages" | tr '\n' ',' | sed 's/,*$//')
T0=$(date +%s)
step() { echo "step $1 $(( $(date +%s) - T0 )) s"; }   # where a cold build's time goes
debootstrap --variant=minbase --include="$PKGS" bookworm "$ROOT" "$MIRROR"
step debootstrap

echo innernet-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 innernet-vm\n' > "$ROOT/etc/hosts"
printf '/dev/vda / ext4 rw,noatime 0 1\n' > "$ROOT/etc/fstab"
# A small initrd (6.5 MB instead of 36 MB): only what mounts the root.
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/initramfs-tools/initramfs.conf"
echo RESUME=none > "$ROOT/etc/initramfs-tools/conf.d/resume"   # nothing to wait for
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$ROOT/etc/initramfs-tools/modules"
chroot "$ROOT" update-initramfs -u -k all >/dev/null
step initramfs
passwd -R "$ROOT" -d root >/dev/null

cat > "$ROOT/usr/local/sbin/innernet-vm-payload" <<'SH'
#!/bin/sh
# Run the host's payload once the boot is finished, then power off.
timeout 300 systemctl is-system-running --wait >/dev/null
mkdir -p /mnt/share
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /mnt/share; then
  if [ -x /mnt/share/payload ]; then
    (cd /mnt/share && ./payload) > /mnt/share/payload.log 2>&1
    echo $? > /mnt/share/rc.tmp && mv /mnt/share/rc.tmp /mnt/share/rc
  fi
  sync
  if [ -e /mnt/share/reboot ]; then rm -f /mnt/share/reboot; sync; exec systemctl reboot; fi
fi
exec systemctl poweroff
SH
chmod 755 "$ROOT/usr/local/sbin/innernet-vm-payload"
cat > "$ROOT/etc/systemd/system/innernet-vm.service" <<'UNIT'
[Unit]
Description=innernet VM test lane: run the host's payload, then power off
# Type=simple: a oneshot unit in multi-user.target would keep the boot from
# ever finishing, which the payload waits for.
[Service]
Type=simple
ExecStart=/usr/local/sbin/innernet-vm-payload
StandardOutput=journal+console
[Install]
WantedBy=multi-user.target
UNIT
chroot "$ROOT" systemctl enable innernet-vm.service >/dev/null 2>&1
# Nothing that would start on its own during a test run.
chroot "$ROOT" systemctl disable apt-daily.timer apt-daily-upgrade.timer man-db.timer \
  e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
# The guest has no network device: nothing to wait for.
chroot "$ROOT" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
# Nor what a test run never uses: under emulation these made half of the
# boot to multi-user (systemd-analyze blame: e2scrub_reap 9 s, logind 7 s,
# each modprobe@ 3-4 s, ...; 24.6 s of userspace start-up became 15.8 s at
# load 6). Power-off and reboot work without logind (systemctl asks systemd).
chroot "$ROOT" systemctl mask e2scrub_reap.service systemd-logind.service \
  systemd-random-seed.service modprobe@drm.service modprobe@dm_mod.service \
  modprobe@loop.service modprobe@fuse.service modprobe@efi_pstore.service \
  modprobe@configfs.service systemd-binfmt.service dev-hugepages.mount dev-mqueue.mount \
  sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
  sys-fs-fuse-connections.mount systemd-update-utmp.service \
  systemd-update-utmp-runlevel.service >/dev/null 2>&1
rm -rf "$ROOT/var/cache/apt/archives/"*.deb "$ROOT/var/lib/apt/lists/"*_Packages

cp -L "$ROOT/vmlinuz" "$OUT/vmlinuz"
cp -L "$ROOT/initrd.img" "$OUT/initrd.img"
rm -f "$OUT/rootfs.ext4"
truncate -s 2G "$OUT/rootfs.ext4"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$ROOT" "$OUT/rootfs.ext4"
step mkfs
rm -rf "$ROOT"
