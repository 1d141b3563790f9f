#!/usr/bin/env bash
# Build the stasis minimal guest initramfs (gzip'd newc cpio) from Debian's
# busybox-static, cached by content hash.
#
# The guest's /init mounts proc, sysfs and devtmpfs, then does what
# `stasis.test=` on the kernel command line selects, and ends with
# `reboot -f`. With `reboot=k` on the kernel command line the guest resets
# through the i8042 keyboard controller, which the VMM turns into a clean exit.
#
#   stasis.test=boot (the default): print one line that starts with the marker
#     STASIS-LINUX-INIT-OK (uptime, cpus, memory, kernel, virtio devices).
#   stasis.test=pause: a guest meant to be paused and resumed while it runs.
#     It writes a 2 MiB random file into a tmpfs, then a background shell keeps
#     a counter n and a value derived from it, h(n) = (31*h(n-1) + n) mod
#     1000003 with h(0) = 1, in its memory and prints
#         TICK <n> h=<h> up=<uptime in 1/100 s> wall=<s.us since 1970> end
#     every 100 ms until n reaches stasis.ticks (default 150); wall is the
#     guest's CLOCK_REALTIME (busybox ash's $EPOCHREALTIME, no fork). The init
#     waits for it, then checks that the counter reached the target with the
#     right h (recomputed from scratch), that the tmpfs file is still there
#     with the same content, that uptime never went backwards and advanced by
#     at least the time slept, and that the wall clock did not go backwards.
#     How long a tick may take (the one across the pause takes as long as the
#     pause) is for whoever paused the guest to judge: only it knows how long
#     the pause was (tests/linux_guest.rs). It prints
#         STASIS-LINUX-RESUME-OK ticks=<n> h=<h> max_tick_gap_ms=... ...
#     or STASIS-LINUX-RESUME-FAIL <reason>. Whether a pause happened between
#     two ticks is for whoever paused it to check (first TICK after the resume
#     greater than the last one before it; tests/nested/run-l1.sh does this).
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

# Parameters with a dot are left to /proc/cmdline by the kernel.
test_mode=boot
ticks=150
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    stasis.test=*) test_mode="${arg#stasis.test=}" ;;
    stasis.ticks=*) ticks="${arg#stasis.ticks=}" ;;
    esac
done

# cs=<uptime in 1/100 s>, without forking ("12.05" -> 1205; no octal trap).
uptime_cs() {
    read -r up _ </proc/uptime
    cs=$((${up%.*} * 100 + 1${up#*.} - 100))
}

# The background counter: all of its state lives in this shell's memory.
ticker() {
    n=0
    h=1
    maxgap=0
    back=0
    uptime_cs
    prev=$cs
    while [ "$n" -lt "$ticks" ]; do
        sleep 0.1
        n=$((n + 1))
        h=$(((h * 31 + n) % 1000003))
        uptime_cs
        gap=$((cs - prev))
        [ "$gap" -ge 0 ] || back=$((back + 1))
        [ "$gap" -le "$maxgap" ] || maxgap=$gap
        prev=$cs
        echo "TICK $n h=$h up=$cs wall=$EPOCHREALTIME end"
    done
    echo "$n $h $maxgap $back" >/tmp/ticker.final
}

pause_test() {
    case "$ticks" in '' | *[!0-9]*) ticks=150 ;; esac
    echo "stasis-init: pause test: $ticks ticks of 100 ms; pause and resume me meanwhile"
    head -c 2097152 /dev/urandom >/tmp/state.bin
    sum0="$(md5sum </tmp/state.bin | cut -d' ' -f1)"
    echo "stasis-state $sum0" >/tmp/state.txt
    uptime_cs
    up0=$cs
    date0="$(date +%s)"
    ticker &
    wait $!
    uptime_cs
    up1=$cs
    date1="$(date +%s)"

    fail=""
    fn="" fh="" fmaxgap="" fback=""
    [ -f /tmp/ticker.final ] && read -r fn fh fmaxgap fback </tmp/ticker.final
    i=0
    hh=1
    while [ "$i" -lt "$ticks" ]; do
        i=$((i + 1))
        hh=$(((hh * 31 + i) % 1000003))
    done
    sum1="$(md5sum </tmp/state.bin 2>/dev/null | cut -d' ' -f1)"
    state="$(cat /tmp/state.txt 2>/dev/null)"
    elapsed=$((up1 - up0))
    if [ -z "$fn" ]; then
        fail="the ticker left no final state in /tmp/ticker.final"
    elif [ "$fn" != "$ticks" ]; then
        fail="the ticker stopped at n=$fn, not $ticks"
    elif [ "$fh" != "$hh" ]; then
        fail="the ticker's h=$fh but h($ticks)=$hh: its memory changed under it"
    elif [ "$fback" != 0 ]; then
        fail="uptime went backwards $fback times between ticks"
    elif [ "$elapsed" -lt "$((ticks * 10))" ]; then
        fail="uptime advanced by ${elapsed}0 ms over $ticks sleeps of 100 ms"
    elif [ "$date1" -lt "$date0" ]; then
        fail="the wall clock went backwards: $date0 -> $date1"
    elif [ "$sum1" != "$sum0" ]; then
        fail="/tmp/state.bin changed: md5 $sum0 -> ${sum1:-<unreadable>}"
    elif [ "$state" != "stasis-state $sum0" ]; then
        fail="/tmp/state.txt changed: '$state'"
    fi
    if [ -n "$fail" ]; then
        echo "STASIS-LINUX-RESUME-FAIL $fail"
    else
        echo "STASIS-LINUX-RESUME-OK ticks=$fn h=$fh max_tick_gap_ms=${fmaxgap}0" \
            "uptime_ms=${up0}0..${up1}0 wall_s=$date0..$date1 tmpfs_md5=$sum1"
    fi
}

case "$test_mode" in
boot)
    up="$(cut -d' ' -f1 /proc/uptime)"
    cpus="$(grep -c '^processor' /proc/cpuinfo)"
    mem="$(grep '^MemTotal' /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
    virtio="$(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
    echo "STASIS-LINUX-INIT-OK uptime=${up}s cpus=$cpus mem_kib=$mem kernel=$(uname -r) virtio=[${virtio% }]"
    ;;
pause)
    pause_test
    ;;
*)
    echo "stasis-init: unknown stasis.test=$test_mode (boot, pause)"
    ;;
esac
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
