#!/usr/bin/env bash
# Build the stasis minimal guest initramfs (gzip'd newc cpio) from Debian's
# busybox-static, cached by content hash.
#
# The guest's /init mounts proc, sysfs and devtmpfs, prints one line that
# starts with the marker STASIS-LINUX-INIT-OK, then `reboot -f`. With
# `reboot=k` on the kernel command line the guest resets through the i8042
# keyboard controller, which the VMM turns into a clean exit.
#
# Usage: rootfs/build-initramfs.sh
# Env:
#   STASIS_CACHE   cache root (default: $HOME/.cache/stasis)
#   STASIS_NO_APT  set to 1 to never call apt-get; fail with a hint instead
#
# Output: the last line on stdout is the absolute path of the archive, at
#   $STASIS_CACHE/initramfs/<hash>/initramfs.cpio.gz
# where <hash> covers this script and the busybox binary.
# Exit status: 0 built or cached, 1 failed, 2 a prerequisite is missing (and
# could not be installed).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/build-initramfs.sh"
cache_root="${STASIS_CACHE:-$HOME/.cache/stasis}"
icache="$cache_root/initramfs"
busybox=/bin/busybox

log() { echo "rootfs/build-initramfs.sh: $*" >&2; }
die() { echo "rootfs/build-initramfs.sh: ERROR: $*" >&2; exit 1; }
# Exit status 2: a prerequisite is missing (tests may report a skip).
prereq() { echo "rootfs/build-initramfs.sh: PREREQUISITE MISSING: $*" >&2; exit 2; }

# The body is one function so that bash parses it whole before running it:
# editing this file while it runs cannot derail the run.
main() {
    # --- prerequisites -------------------------------------------------------
    need_pkgs=()
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
        || need_pkgs+=(busybox-static)
    command -v cpio >/dev/null 2>&1 || need_pkgs+=(cpio)
    command -v gzip >/dev/null 2>&1 || need_pkgs+=(gzip)
    if ((${#need_pkgs[@]})); then
        if [[ "${STASIS_NO_APT:-0}" == 1 || "$(id -u)" != 0 ]]; then
            prereq "packages ${need_pkgs[*]}; install them with: apt-get install -y ${need_pkgs[*]}"
        fi
        log "installing missing packages: ${need_pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${need_pkgs[@]}" >&2 || prereq "apt-get install ${need_pkgs[*]} failed"
    fi
    [[ -x "$busybox" ]] || die "$busybox missing although busybox-static is installed"
    # A dynamically linked busybox would need its libraries in the guest.
    if command -v file >/dev/null 2>&1 && file -L "$busybox" | grep -q 'dynamically linked'; then
        die "$busybox is dynamically linked; install busybox-static"
    fi

    # --- cache lookup --------------------------------------------------------
    hash="$(sha256sum "$self" "$busybox" | cut -d' ' -f1 | sha256sum | cut -c1-16)"
    out_dir="$icache/$hash"
    out="$out_dir/initramfs.cpio.gz"
    if [[ -s "$out" ]]; then
        log "cached: $out"
        echo "$out"
        exit 0
    fi
    mkdir -p "$icache"

    # --- newc entry writer (device nodes without root or mknod) --------------
    # newc_entry NAME MODE_OCTAL RDEV_MAJOR RDEV_MINOR: one header-only entry.
    newc_entry() {
        local name="$1" mode=$((8#$2)) maj="$3" min="$4" nlink=1
        local namesize=$((${#name} + 1))
        printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
            0 "$mode" 0 0 "$nlink" 0 0 0 0 "$maj" "$min" "$namesize" 0
        printf '%s\0' "$name"
        local pad=$(((4 - (110 + namesize) % 4) % 4))
        ((pad == 0)) || head -c "$pad" /dev/zero
    }

    # --- staging tree --------------------------------------------------------
    stage="$(mktemp -d "$icache/stage.XXXXXX")"
    trap 'rm -rf "$stage"' EXIT
    root="$stage/root"
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,root,mnt}
    cp "$busybox" "$root/bin/busybox"
    for applet in $("$busybox" --list); do
        [[ "$applet" == busybox ]] || ln -s busybox "$root/bin/$applet"
    done

    cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# stasis minimal guest init (rootfs/build-initramfs.sh)
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
up="$(cut -d' ' -f1 /proc/uptime)"
cpus="$(grep -c '^processor' /proc/cpuinfo)"
mem="$(grep '^MemTotal' /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
virtio="$(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
echo "STASIS-LINUX-INIT-OK uptime=${up}s cpus=$cpus mem_kib=$mem kernel=$(uname -r) virtio=[${virtio% }]"
reboot -f
echo "stasis-init: reboot -f returned; halting" >&2
halt -f
EOF
    chmod 0755 "$root/init"
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"

    # Reproducible archive: fixed mtimes, owner 0:0, sorted names, no gzip name/time.
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio -o -H newc --owner=0:0 --reproducible --quiet) >"$stage/main.cpio"
    {
        newc_entry dev/console 020600 5 1
        newc_entry TRAILER!!! 0 0 0
    } >"$stage/dev.cpio"
    mkdir -p "$out_dir.tmp.$$"
    cat "$stage/main.cpio" "$stage/dev.cpio" | gzip -n -9 >"$out_dir.tmp.$$/initramfs.cpio.gz"
    rm -rf "$out_dir"
    mv "$out_dir.tmp.$$" "$out_dir"
    log "built: $out ($(du -h "$out" | cut -f1))"
    echo "$out"
}

main "$@"
