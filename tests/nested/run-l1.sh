#!/usr/bin/env bash
# Nested-emulation harness: boot a Linux guest under stasis inside an
# emulated x86 machine ("L1") whose own KVM runs ring-0 code natively.
#
# Our build machines' /dev/kvm emulates guest ring-0 code one instruction at
# a time, so Linux cannot boot on it directly (see docs/host-kvm.md). Here
# QEMU emulates a whole machine in software (TCG) with AMD-V (SVM + NPT); the
# L1 kernel (Debian's cloud kernel) loads kvm-amd, and stasis runs inside L1
# on that /dev/kvm.
#
# Usage: tests/nested/run-l1.sh STASIS_BIN VMLINUX INITRAMFS
#
# Exit status: 0 only if the inner guest printed STASIS-LINUX-INIT-OK and
# `stasis run` exited with status 0; 1 on a failed run; 2 on a missing
# prerequisite or bad usage. The L1 console is streamed to stdout; the last
# lines are a summary starting with "run-l1:".
#
# Env:
#   STASIS_CACHE          cache root (default: $HOME/.cache/stasis)
#   STASIS_NO_APT         1: never call apt-get; fail with a hint instead
#   STASIS_L1_TIMEOUT     hard limit in seconds for the whole L1 run (600)
#   STASIS_L1_MEM         L1 memory in MiB (2048)
#   STASIS_L1_SMP         L1 vCPUs (1)
#   STASIS_INNER_TIMEOUT  limit in seconds for `stasis run` inside L1 (300)
#   STASIS_INNER_MEM      --mem for the inner guest (256M)
#   STASIS_INNER_VCPUS    --vcpus for the inner guest (1)
#   STASIS_INNER_CMDLINE  kernel command line for the inner guest
#   STASIS_LOG            passed on to stasis inside L1 (its log filter)
#   STASIS_L1_EXTRA       extra host paths (space separated) copied into L1 at
#                         the same path, with the libraries `ldd` lists
#   STASIS_L1_COMMAND     debugging stand-in: shell command run in L1 instead
#                         of `stasis run` (its exit status is reported); the
#                         marker check still applies unless
#                         STASIS_L1_EXPECT_MARKER=0
set -euo pipefail

cache_root="${STASIS_CACHE:-$HOME/.cache/stasis}"
marker="STASIS-LINUX-INIT-OK"

log() { echo "run-l1: $*" >&2; }
prereq() { echo "run-l1: PREREQUISITE MISSING: $*" >&2; exit 2; }
die() { echo "run-l1: ERROR: $*" >&2; exit 1; }

# The body is one function so that bash parses it whole before running it:
# editing this file while it runs cannot derail the run.
main() {
    (($# == 3)) || { echo "usage: $0 STASIS_BIN VMLINUX INITRAMFS" >&2; exit 2; }
    stasis_bin="$(realpath "$1")"
    vmlinux="$(realpath "$2")"
    initramfs="$(realpath "$3")"
    for f in "$stasis_bin" "$vmlinux" "$initramfs"; do
        [[ -f "$f" ]] || prereq "no such file: $f"
    done
    [[ -x "$stasis_bin" ]] || prereq "not executable: $stasis_bin"

    l1_timeout="${STASIS_L1_TIMEOUT:-600}"
    l1_mem="${STASIS_L1_MEM:-2048}"
    l1_smp="${STASIS_L1_SMP:-1}"
    inner_timeout="${STASIS_INNER_TIMEOUT:-300}"
    inner_mem="${STASIS_INNER_MEM:-256M}"
    inner_vcpus="${STASIS_INNER_VCPUS:-1}"
    inner_cmdline="${STASIS_INNER_CMDLINE:-console=ttyS0 earlyprintk=serial reboot=k panic=-1 pci=off}"
    expect_marker="${STASIS_L1_EXPECT_MARKER:-1}"

    # --- host prerequisites --------------------------------------------------
    need_pkgs=()
    command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs+=(qemu-system-x86)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
        || need_pkgs+=(busybox-static)
    command -v cpio >/dev/null 2>&1 || need_pkgs+=(cpio)
    if ((${#need_pkgs[@]})); then
        if [[ "${STASIS_NO_APT:-0}" == 1 || "$(id -u)" != 0 ]]; then
            prereq "packages ${need_pkgs[*]}; install them with: apt-get install -y ${need_pkgs[*]}"
        fi
        log "installing missing packages: ${need_pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${need_pkgs[@]}" >&2 || prereq "apt-get install ${need_pkgs[*]} failed"
    fi

    # --- L1 kernel and KVM modules: Debian's cloud kernel, cached by .deb hash ---
    meta_pkg=linux-image-cloud-amd64
    img_pkg="$(apt-cache depends "$meta_pkg" 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n1)"
    [[ -n "$img_pkg" ]] || prereq "apt-cache knows no $meta_pkg (run apt-get update)"
    img_sha="$(apt-cache show --no-all-versions "$img_pkg" 2>/dev/null \
        | sed -n 's/^SHA256: //p' | head -n1)"
    [[ -n "$img_sha" ]] || prereq "apt-cache show $img_pkg gives no SHA256"
    l1k="$cache_root/l1-kernel/${img_sha:0:16}"
    if [[ ! -f "$l1k/.complete" ]]; then
        [[ "${STASIS_NO_APT:-0}" != 1 ]] \
            || prereq "L1 kernel $img_pkg not cached in $l1k and STASIS_NO_APT=1"
        mkdir -p "$cache_root/l1-kernel"
        dl="$(mktemp -d "$cache_root/l1-kernel/dl.XXXXXX")"
        log "downloading $img_pkg (L1 kernel and kvm modules)"
        apt_opts=()
        [[ "$(id -u)" != 0 ]] || apt_opts=(-o APT::Sandbox::User=root)
        (cd "$dl" && apt-get download "${apt_opts[@]}" "$img_pkg" >&2) \
            || { rm -rf "$dl"; prereq "apt-get download $img_pkg failed"; }
        deb="$(ls "$dl"/*.deb)"
        echo "$img_sha  $deb" | sha256sum -c --quiet - \
            || { rm -rf "$dl"; die "$deb does not match the SHA256 apt-cache lists"; }
        dpkg -x "$deb" "$dl/x"
        mkdir -p "$dl/out"
        cp "$dl"/x/boot/vmlinuz-* "$dl/out/vmlinuz"
        for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
            found=("$dl"/x/lib/modules/*/kernel/"$m".ko*)
            src="${found[0]}"
            [[ -e "$src" ]] || { rm -rf "$dl"; die "$img_pkg has no module $m"; }
            case "$src" in
            *.ko) cp "$src" "$dl/out/$(basename "$m").ko" ;;
            *.ko.xz) xz -dc "$src" >"$dl/out/$(basename "$m").ko" ;;
            *.ko.zst) zstd -dcq "$src" >"$dl/out/$(basename "$m").ko" ;;
            *) rm -rf "$dl"; die "unknown module compression: $src" ;;
            esac
        done
        echo "$img_pkg $img_sha" >"$dl/out/package"
        touch "$dl/out/.complete"
        rm -rf "$l1k"
        mv "$dl/out" "$l1k"
        rm -rf "$dl"
    fi
    log "L1 kernel: $(cat "$l1k/package")"

    # --- newc entry writer (device nodes without root or mknod) --------------
    newc_entry() {
        local name="$1" mode=$((8#$2)) maj="$3" min="$4"
        local namesize=$((${#name} + 1))
        printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
            0 "$mode" 0 0 1 0 0 0 0 "$maj" "$min" "$namesize" 0
        printf '%s\0' "$name"
        local pad=$(((4 - (110 + namesize) % 4) % 4))
        ((pad == 0)) || head -c "$pad" /dev/zero
    }

    # copy_with_libs SRC: copy SRC to the same path under $root, plus its libraries.
    copy_with_libs() {
        local src="$1" dst="$root$1"
        mkdir -p "$(dirname "$dst")"
        if [[ -d "$src" ]]; then
            cp -a "$src/." "$dst/"
            return
        fi
        cp -L "$src" "$dst"
        local lib
        # `ldd` fails on static binaries and scripts: then there is nothing to copy.
        for lib in $( (ldd "$src" 2>/dev/null || true) | grep -o '/[^ ]*'); do
            [[ -e "$root$lib" ]] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    }

    # --- L1 initramfs --------------------------------------------------------
    work="$(mktemp -d "${TMPDIR:-/tmp}/stasis-l1.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    root="$work/root"
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,etc,l1}
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [[ "$applet" == busybox ]] || ln -s busybox "$root/bin/$applet"
    done
    cp "$l1k"/{irqbypass,kvm,kvm-amd}.ko "$root/l1/"
    # The VMM goes to /stasis; its libraries keep their host paths. A copy without
    # debug info is smaller to load and unpack under TCG.
    copy_with_libs "$stasis_bin"
    mv "$root$stasis_bin" "$root/stasis"
    strip --strip-debug "$root/stasis" 2>/dev/null || true
    cp "$vmlinux" "$root/vmlinux"
    cp "$initramfs" "$root/initramfs.cpio.gz"
    for extra in ${STASIS_L1_EXTRA:-}; do
        [[ -e "$extra" ]] || prereq "STASIS_L1_EXTRA path does not exist: $extra"
        copy_with_libs "$(realpath "$extra")"
    done

    if [[ -n "${STASIS_L1_COMMAND:-}" ]]; then
        run_cmd="$STASIS_L1_COMMAND"
    else
        run_cmd="$(printf '%q ' /stasis run --kernel /vmlinux \
            --initrd /initramfs.cpio.gz --cmdline "$inner_cmdline" --mem "$inner_mem" \
            --vcpus "$inner_vcpus")"
    fi
    # The init reads its parameters from this file (sourced by busybox sh).
    {
        printf 'RUN_CMD=%q\n' "$run_cmd"
        printf 'INNER_TIMEOUT=%q\n' "$inner_timeout"
        [[ -z "${STASIS_LOG:-}" ]] || printf 'export STASIS_LOG=%q\n' "$STASIS_LOG"
    } >"$root/l1/params"

    cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# L1 init (tests/nested/run-l1.sh): load KVM, run the inner VMM, report.
export PATH=/bin:/usr/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
. /l1/params
up() { cut -d' ' -f1 /proc/uptime; }
finish() {
    echo "STASIS-L1-RESULT $1"
    sync
    poweroff -f
}
echo "stasis-l1: init started at L1 uptime $(up)s"
grep -qw svm /proc/cpuinfo || echo "stasis-l1: WARNING: no svm flag in /proc/cpuinfo"
for m in irqbypass kvm kvm-amd; do
    insmod /l1/$m.ko || finish "FAIL insmod $m.ko"
done
[ -c /dev/kvm ] || finish "FAIL no /dev/kvm after loading kvm-amd"
echo "stasis-l1: /dev/kvm ready at L1 uptime $(up)s"
echo "stasis-l1: running (limit ${INNER_TIMEOUT}s): $RUN_CMD"
echo "stasis-l1: ----- inner output begins -----"
t0="$(up)"
timeout -s KILL "$INNER_TIMEOUT" sh -c "$RUN_CMD" </dev/null
status=$?
t1="$(up)"
echo ""
echo "stasis-l1: ----- inner output ends -----"
echo "STASIS-L1-EXIT status=$status elapsed=$(echo "$t1 $t0" | awk '{printf "%.2f", $1 - $2}')s"
finish "DONE"
EOF
    chmod 0755 "$root/init"

    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio -o -H newc --owner=0:0 --reproducible --quiet) >"$work/l1.cpio"
    {
        newc_entry dev/console 020600 5 1
        newc_entry TRAILER!!! 0 0 0
    } >>"$work/l1.cpio"
    log "L1 initramfs: $(du -h "$work/l1.cpio" | cut -f1) (uncompressed)"

    # --- run L1 --------------------------------------------------------------
    console="$work/console.log"
    log "booting L1 (qemu TCG, -cpu max, ${l1_mem} MiB, ${l1_smp} vCPU, limit ${l1_timeout}s)"
    t_start=$SECONDS
    set +e
    timeout --foreground -k 10 "$l1_timeout" qemu-system-x86_64 \
        -accel tcg -cpu max -m "$l1_mem" -smp "$l1_smp" \
        -nographic -no-reboot -nodefaults -serial stdio \
        -kernel "$l1k/vmlinuz" -initrd "$work/l1.cpio" \
        -append "console=ttyS0 panic=-1 quiet" \
        </dev/null 2>&1 | tee "$console"
    qemu_rc=${PIPESTATUS[0]}
    set -e
    t_total=$((SECONDS - t_start))

    # --- verdict -------------------------------------------------------------
    # Console lines end in \r\n; strip the \r before matching.
    clean="$work/console.clean"
    tr -d '\r' <"$console" >"$clean"
    exit_line="$(grep -a '^STASIS-L1-EXIT ' "$clean" | tail -n1 || true)"
    result_line="$(grep -a '^STASIS-L1-RESULT ' "$clean" | tail -n1 || true)"
    # The marker counts only inside the inner VMM's output.
    marker_line="$(sed -n '/^stasis-l1: ----- inner output begins/,/^stasis-l1: ----- inner output ends/p' \
        "$clean" | grep -a "$marker" | head -n1 || true)"
    qemu_note=""
    ((qemu_rc != 124 && qemu_rc != 137)) || qemu_note=" (hard timeout ${l1_timeout}s)"
    echo "run-l1: ===== summary ====="
    echo "run-l1: qemu exit: $qemu_rc$qemu_note"
    echo "run-l1: L1 result: ${result_line:-<none>}"
    echo "run-l1: inner exit: ${exit_line:-<none>}"
    echo "run-l1: inner marker: ${marker_line:-<not seen>}"
    echo "run-l1: total wall time: ${t_total}s"
    fail=""
    if [[ -z "$result_line" ]]; then
        fail="L1 never reported a result (qemu exit $qemu_rc)"
    elif [[ "$result_line" != "STASIS-L1-RESULT DONE" ]]; then
        fail="L1 setup failed: ${result_line#STASIS-L1-RESULT }"
    elif [[ "$exit_line" != "STASIS-L1-EXIT status=0 "* ]]; then
        fail="inner VMM did not exit cleanly: ${exit_line:-<no exit line>}"
    elif [[ "$expect_marker" == 1 && -z "$marker_line" ]]; then
        fail="the inner guest never printed the init marker"
    fi
    if [[ -n "$fail" ]]; then
        echo "run-l1: FAIL: $fail"
        exit 1
    fi
    echo "run-l1: PASS"
}

main "$@"
