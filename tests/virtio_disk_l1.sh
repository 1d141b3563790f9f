#!/usr/bin/env bash
# Linux on a virtio-blk copy-on-write root disk, paused and resumed in a
# fresh process, through nested emulation (tests/nested/run-l1.sh).
#
# Usage: tests/virtio_disk_l1.sh STASIS_BIN VMLINUX INITRAMFS
# (INITRAMFS is only what run-l1.sh requires; the guest boots from the disk.)
#        tests/virtio_disk_l1.sh --prepare DIR
# (what `cargo test` uses: tests/linux_guest.rs runs these checks in the L1 of
# its boot test. Builds the disk image and the L1 script in DIR, an empty
# directory, and prints the command to run in L1 as the last stdout line;
# DIR must be copied into L1 at the same path, STASIS_L1_EXTRA=DIR.)
#
# Inside L1: (1) `stasis run --disk rootfs.img --overlay ov.img`: the guest's
# init (on an ext4 image built here with busybox) writes /persist.txt, then
# every second drops its page cache, reads /persist.txt and /after.txt from
# disk and writes /after.txt; SIGUSR1 pauses it into a snapshot. (2) `stasis
# resume` in a fresh process: the ticks go on and read what was written
# before the pause from the disk. (3) A cold boot on the snapshot's overlay
# sees the files written before and after the pause. The base image must be
# unchanged. Exit status: that of run-l1.sh (0 = every check passed).
set -euo pipefail
usage="usage: $0 STASIS_BIN VMLINUX INITRAMFS | $0 --prepare DIR"
prepare=""
if [[ "${1:-}" == --prepare ]]; then
    (($# == 2)) || { echo "$usage" >&2; exit 2; }
    prepare="$(realpath "$2")"
    [[ -d "$prepare" ]] || { echo "virtio_disk_l1: no such directory: $2" >&2; exit 2; }
else
    (($# == 3)) || { echo "$usage" >&2; exit 2; }
fi
here="$(cd "$(dirname "$0")" && pwd)"
command -v mkfs.ext4 >/dev/null || { echo "virtio_disk_l1: PREREQUISITE MISSING: mkfs.ext4 (e2fsprogs)" >&2; exit 2; }
[[ -x /bin/busybox ]] || { echo "virtio_disk_l1: PREREQUISITE MISSING: /bin/busybox (busybox-static)" >&2; exit 2; }

if [[ -n "$prepare" ]]; then
    d="$prepare"
else
    d="$(mktemp -d "${TMPDIR:-/tmp}/stasis-virtio-l1.XXXXXX")"
    trap 'rm -rf "$d"' EXIT
fi
mkdir -p "$d/root"/{bin,dev,proc,sys,tmp}
cp /bin/busybox "$d/root/bin/busybox"
for a in sh mount cat echo sleep sync reboot grep; do ln -s busybox "$d/root/bin/$a"; done
cat >"$d/root/init" <<'EOF'
#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
[ -f /persist.txt ] && echo "STASIS-DISK-SEEN-AT-BOOT $(cat /persist.txt) | after: $(cat /after.txt)"
echo "written-before-pause $(cat /proc/uptime)" > /persist.txt
sync
echo "STASIS-LINUX-INIT-OK"
echo "STASIS-DISK-WROTE $(cat /persist.txt)"
i=0
while [ $i -lt 15 ]; do
    i=$((i + 1))
    echo 3 > /proc/sys/vm/drop_caches
    echo "tick $i: $(cat /persist.txt) | after: $(cat /after.txt 2>/dev/null)"
    echo "tick-$i" > /after.txt
    sync
    sleep 1
done
echo "STASIS-DISK-DONE"
reboot -f
EOF
chmod 0755 "$d/root/init"
# mkfs.ext4 -d copies device nodes only as root; the kernel's devtmpfs
# provides /dev/console otherwise.
mknod "$d/root/dev/console" c 5 1 2>/dev/null || true
mkfs.ext4 -q -d "$d/root" "$d/rootfs.img" 16M
cp "$d/rootfs.img" "$d/rootfs.orig"

cat >"$d/l1.sh" <<EOF
#!/bin/sh
D=$d
EOF
cat >>"$d/l1.sh" <<'EOF'
CMD="console=ttyS0 reboot=k panic=-1 pci=off root=/dev/vda rw rootfstype=ext4 init=/init"
fail() { echo "virtio-l1: FAIL: $*"; exit 1; }
waitfor() {
    n=0
    while ! grep -q "$1" "$2" 2>/dev/null; do
        n=$((n+1))
        [ $n -gt 360 ] && { tail -n 30 "$2"; fail "timeout waiting for '$1' in $2"; }
        sleep 0.5
    done
}
echo "virtio-l1: 1. boot on the copy-on-write disk; pause on SIGUSR1"
/stasis run --kernel /vmlinux --disk $D/rootfs.img --overlay /tmp/ov.img --cmdline "$CMD" --mem 128M --console /tmp/c1 --snapshot-on-signal /tmp/snap &
pid=$!
waitfor "tick 3:" /tmp/c1
kill -USR1 $pid; wait $pid || fail "stasis run exited $?"
grep -a -e STASIS -e tick /tmp/c1
ls -ls /tmp/snap /tmp/ov.img /tmp/ov.img.map
/stasis snapshot info /tmp/snap
echo "virtio-l1: 2. resume in a fresh process"
/stasis resume /tmp/snap --disk $D/rootfs.img --console /tmp/c2 || fail "stasis resume exited $?"
grep -a -e STASIS -e tick /tmp/c2
grep -q "after: tick-3" /tmp/c2 || fail "the resumed guest did not read the pre-pause write from disk"
grep -q "STASIS-DISK-DONE" /tmp/c2 || fail "the resumed guest did not finish"
echo "virtio-l1: 3. cold boot on the snapshot's overlay"
/stasis run --kernel /vmlinux --disk $D/rootfs.img --overlay /tmp/snap/disk.overlay --cmdline "$CMD" --mem 128M --console /tmp/c3 &
pid=$!
waitfor "tick 1:" /tmp/c3
kill $pid; wait $pid
grep -a -e STASIS -e tick /tmp/c3
grep -q "STASIS-DISK-SEEN-AT-BOOT written-before-pause .* after: tick-15" /tmp/c3 || fail "the overlay lost the guest's writes"
cmp $D/rootfs.img $D/rootfs.orig || fail "the base image changed"
echo "virtio-l1: all checks passed"
EOF
chmod 0755 "$d/l1.sh"
# The image's own files must not travel as extra paths: only the image does.
rm -rf "$d/root"
if [[ -n "$prepare" ]]; then
    echo "sh $d/l1.sh"
    exit 0
fi

STASIS_L1_EXTRA="$d ${STASIS_L1_EXTRA:-}" STASIS_L1_COMMAND="sh $d/l1.sh" \
    "$here/nested/run-l1.sh" "$@"
