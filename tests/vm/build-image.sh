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
ROOT=$OUT/root
mkdir -p "$OUT"
rm -rf "$ROOT"
PKGS=$(grep -v '^#' "$HERE/packages" | tr '\n' ',' | sed 's/,*$//')
debootstrap --variant=minbase --include="$PKGS" bookworm "$ROOT" "$MIRROR"

echo innernet-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 innernet-vm\n' > "$ROOT/etc/hosts"
printf '/dev/vda / ext4 rw,noatime 0 1\n' > "$ROOT/etc/fstab"
# A small initrd (6.5 MB instead of 36 MB): only what mounts the root.
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$ROOT/etc/initramfs-tools/modules"
chroot "$ROOT" update-initramfs -u -k all >/dev/null
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
chroot "$ROOT" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
# The guest has no network device: nothing to wait for.
rm -rf "$ROOT/var/cache/apt/archives/"*.deb "$ROOT/var/lib/apt/lists/"*_Packages

cp -L "$ROOT/vmlinuz" "$OUT/vmlinuz"
cp -L "$ROOT/initrd.img" "$OUT/initrd.img"
rm -f "$OUT/rootfs.ext4"
truncate -s 2G "$OUT/rootfs.ext4"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$ROOT" "$OUT/rootfs.ext4"
rm -rf "$ROOT"
