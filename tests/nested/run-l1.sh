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
#        STASIS_L1_SCENARIO=serve STASIS_SERVE_CLIENT=CMD \
#            tests/nested/run-l1.sh STASIS_BIN VMLINUX ROOTFS_EXT4
#
# Scenarios (STASIS_L1_SCENARIO):
#   boot (default)  `stasis run` the guest to its end; it must print
#                   STASIS-LINUX-INIT-OK.
#   pause-resume    the guest runs its pause test (`stasis.test=pause` is
#                   added to its command line unless it has a stasis.test=;
#                   see rootfs/build-initramfs.sh): `stasis run
#                   --snapshot-on-signal /snap --console /c1` in the
#                   background until the guest printed TICK $STASIS_PR_PAUSE_AT,
#                   SIGUSR1, which must pause it to /snap with exit status 0;
#                   `stasis snapshot info /snap`; then `stasis resume /snap
#                   --lazy --console /c2` in a fresh process, and (unless
#                   STASIS_PR_EAGER=0) `stasis resume /snap --eager --console
#                   /c3` from the same snapshot. Each resume must exit 0 with
#                   STASIS-LINUX-RESUME-OK and no second boot in its console,
#                   its first TICK must be greater than the last TICK before
#                   the pause, and every TICK line of the run and the resume
#                   together must count up with the right derived value h (see
#                   the guest). The consoles are printed with [c1]/[c2]/[c3]
#                   prefixes, stasis's stderr with [run]/[lazy]/[eager]; the
#                   scenario's verdict is one line, STASIS-PR-VERDICT PASS|FAIL.
#                   The snapshot stays on disk STASIS_PR_PAUSED_S seconds
#                   before the lazy resume. For the clock checks of
#                   tests/linux_guest.rs, L1's wall clock ($EPOCHREALTIME)
#                   around each observation is printed as "pause-resume:
#                   clock: ..." lines: between which two L1 times the TICK
#                   the run waited for was first seen, when SIGUSR1 was sent
#                   and `stasis run` exited, when each resume started and
#                   between which two times its first complete TICK was seen.
#   serve           L1 gets a network card (QEMU user networking, 10.0.2.15)
#                   and runs `stasis serve --listen 0.0.0.0:3000 --data-dir
#                   /data $STASIS_SERVE_LINUX_ARGS $STASIS_SERVE_ARGS`; the
#                   host port STASIS_L1_HOST_PORT (default: a free one) is
#                   forwarded to it. Once
#                   http://127.0.0.1:PORT/health answers on the host, the host
#                   runs `bash -c "$STASIS_SERVE_CLIENT"` with STASIS_L1_URL
#                   set to that URL (and STASIS_L1_QEMU_PID to QEMU's pid);
#                   its exit status is the verdict. Then L1
#                   is stopped. The rootfs image travels sparse (only its
#                   non-zero blocks are in the L1 initramfs).
#                   With STASIS_L1_FAKE_INTERNET=1 the server's sandboxes get
#                   their network (otherwise `--no-network`): L1 also
#                   carries the host's `nft`, `ip`, `nsenter` and `dnsmasq`
#                   (with their libraries) and the netfilter, tun and veth
#                   modules, and before the server starts it makes the
#                   namespaces of tests/nested/fake-internet.sh (uplink
#                   "fi-up", internet "fi-inet": 203.0.113.1 and
#                   198.51.100.1 with a web server, a TCP sink and a DNS
#                   name files.example.test); the server gets
#                   `--sandbox-uplink-netns fi-up --sandbox-dns 203.0.113.1`,
#                   so a guest's packets reach only those namespaces (L1's
#                   own network, QEMU's user networking, is not on their way).
#
# Exit status: 0 only if the inner run exited with status 0 and the guest
# printed the scenario's marker (STASIS-LINUX-INIT-OK for boot,
# STASIS-LINUX-RESUME-OK and STASIS-PR-VERDICT PASS for pause-resume; for
# serve: the client exited 0); 1 on a failed run; 2 on a missing
# prerequisite or bad usage; 3 when the run failed with evidence that cannot
# come from stasis ("L1 FAULT"): L1 failed before it launched stasis (its
# init prints a line starting with STASIS-L1-LAUNCH just before; absent, L1
# itself failed), or QEMU itself ended abnormally (an exit status other than
# 0 that the harness did not cause by stopping it). Nothing else is an L1
# fault: a soft lockup, an RCU stall or a quiet heartbeat in L1 is also what
# a guest spinning under a stasis bug causes, so those are reported ("L1
# health") but a run that failed with them is a failure (exit 1). Callers may
# retry on 3 (tests/nested/support.rs classifies the same text the same way
# and bounds the retries). The L1
# console (ttyS0: init and stasis output) is streamed to stdout; the L1
# kernel's own log (ttyS1) and heartbeat (ttyS2, every 5 s) go to files and
# are shown at the end; the last lines are a summary starting with "run-l1:".
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
#   STASIS_FAULT          passed on to stasis inside L1: fault injection for
#                         the tests (src/worker/: abort-after-resume)
#   STASIS_L1_AFTER       boot: shell command run in L1 after the boot run
#                         succeeded (its status becomes the inner status)
#   STASIS_L1_QEMU_ARGS   debugging: extra qemu-system-x86_64 arguments (split
#                         on spaces), e.g. "-monitor unix:/tmp/l1.mon,server,nowait"
#   STASIS_L1_APPEND      L1 kernel command line ("console=ttyS1 panic=-1 quiet")
#   STASIS_L1_EXTRA       extra host paths (space separated) copied into L1 at
#                         the same path, with the libraries `ldd` lists
#   STASIS_L1_SCENARIO    boot, pause-resume or serve (boot)
#   STASIS_SERVE_CLIENT   serve: host command run once the server answers
#   STASIS_SERVE_ARGS     serve: more `stasis serve` arguments (e.g. --api-key K)
#   STASIS_SERVE_LINUX_ARGS serve: the arguments that give the server its
#                         Linux template ("--kernel /vmlinux --rootfs
#                         /rootfs.ext4"; empty: only the built-in templates)
#   STASIS_SERVE_READY_TIMEOUT serve: seconds to wait for /health (300)
#   STASIS_L1_HOST_PORT   serve: host port forwarded to the server (a free one)
#   STASIS_L1_FAKE_INTERNET serve: 1 to give sandboxes a network behind a
#                         fake internet (see the serve scenario) (0)
#   STASIS_L1_DATA_SIZE   serve: /data (the server's data dir) is a tmpfs of
#                         this size (e.g. 60%) instead of part of L1's root
#                         tmpfs (half of L1's memory, shared with the rootfs
#                         image)
#   STASIS_L1_FWD         serve: more forwarded ports, space separated
#                         HOSTIP:HOSTPORT-L1PORT (e.g. 127.9.8.7:443-443 for
#                         the server's --tls-listen 0.0.0.0:443)
#   STASIS_INNER_BACKING  pause-resume: --memory-backing for run and both
#                         resumes (auto, hugetlb, thp, 4k; unset: stasis's
#                         default); the scenario fails unless stasis says it
#                         used that backing
#   STASIS_L1_HUGEPAGES   2 MiB pages L1 reserves (/proc/sys/vm/nr_hugepages)
#                         before stasis starts (0)
#   STASIS_PR_PAUSE_AT    pause-resume: pause once the guest printed this TICK (40)
#   STASIS_PR_PAUSED_S    pause-resume: seconds the snapshot stays on disk
#                         before the lazy resume (6), long enough for the
#                         clock checks to tell an advanced clock from one
#                         that was not
#   STASIS_PR_EAGER       pause-resume: 1 to also resume eagerly, 0 not to (1)
#   STASIS_PR_STEP_TIMEOUT pause-resume: limit in seconds for each step (the
#                         run until the pause, each resume) (150). A step past
#                         it lists stasis's threads and pauses the hung guest
#                         (SIGUSR1) into /snap (run) or /snap-hung-MODE.
#   STASIS_PR_ON_HANG     pause-resume, debugging: shell command run in L1 with
#                         the hung guest's snapshot directory as "$1" (bring a
#                         tool in with STASIS_L1_EXTRA)
#   STASIS_L1_COMMAND     debugging stand-in: shell command run in L1 instead
#                         of `stasis run` or the scenario (its exit status is
#                         reported); the marker check still applies unless
#                         STASIS_L1_EXPECT_MARKER=0
set -euo pipefail

cache_root="${STASIS_CACHE:-$HOME/.cache/stasis}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

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
    scenario="${STASIS_L1_SCENARIO:-boot}"
    pause_at="${STASIS_PR_PAUSE_AT:-40}"
    pr_eager="${STASIS_PR_EAGER:-1}"
    step_timeout="${STASIS_PR_STEP_TIMEOUT:-150}"
    fake_internet="${STASIS_L1_FAKE_INTERNET:-0}"
    [[ "$fake_internet" == [01] ]] || { echo "run-l1: STASIS_L1_FAKE_INTERNET must be 0 or 1" >&2; exit 2; }
    [[ "$fake_internet" == 0 || "$scenario" == serve ]] \
        || { echo "run-l1: STASIS_L1_FAKE_INTERNET=1 needs STASIS_L1_SCENARIO=serve" >&2; exit 2; }
    case "$scenario" in
    boot) marker="STASIS-LINUX-INIT-OK" ;;
    pause-resume)
        marker="STASIS-LINUX-RESUME-OK"
        [[ "$pause_at" =~ ^[1-9][0-9]*$ ]] || { echo "run-l1: STASIS_PR_PAUSE_AT must be a positive integer" >&2; exit 2; }
        [[ "$step_timeout" =~ ^[1-9][0-9]*$ ]] || { echo "run-l1: STASIS_PR_STEP_TIMEOUT must be a positive integer" >&2; exit 2; }
        [[ "$pr_eager" == [01] ]] || { echo "run-l1: STASIS_PR_EAGER must be 0 or 1" >&2; exit 2; }
        [[ " $inner_cmdline " == *" stasis.test="* ]] || inner_cmdline+=" stasis.test=pause"
        ;;
    serve)
        marker="STASIS-L1-SERVE-STARTED"
        [[ -n "${STASIS_SERVE_CLIENT:-}" ]] \
            || { echo "run-l1: serve: STASIS_SERVE_CLIENT (the host command to run) is not set" >&2; exit 2; }
        ready_timeout="${STASIS_SERVE_READY_TIMEOUT:-300}"
        [[ "$ready_timeout" =~ ^[1-9][0-9]*$ ]] || { echo "run-l1: STASIS_SERVE_READY_TIMEOUT must be a positive integer" >&2; exit 2; }
        command -v python3 >/dev/null 2>&1 || prereq "python3 (the serve scenario polls /health with it)"
        host_port="${STASIS_L1_HOST_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
        ;;
    *) echo "run-l1: unknown STASIS_L1_SCENARIO=$scenario (boot, pause-resume, serve)" >&2; exit 2 ;;
    esac

    # --- host prerequisites --------------------------------------------------
    need_pkgs=()
    command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs+=(qemu-system-x86)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
        || need_pkgs+=(busybox-static)
    command -v cpio >/dev/null 2>&1 || need_pkgs+=(cpio)
    if [[ "$fake_internet" == 1 ]]; then
        # Carried into L1: what stasis's sandbox networking runs (src/net)
        # and the fake internet's DNS server.
        command -v nft >/dev/null 2>&1 || need_pkgs+=(nftables)
        command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
        command -v nsenter >/dev/null 2>&1 || need_pkgs+=(util-linux)
        command -v dnsmasq >/dev/null 2>&1 || need_pkgs+=(dnsmasq-base)
    fi
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
    # KVM for every scenario; virtio-net (PCI) for serve's network card.
    l1_mods=(virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd
        drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci_legacy_dev
        drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci net/core/failover
        drivers/net/net_failover drivers/net/virtio_net)
    # Sandbox networking in L1 (STASIS_L1_FAKE_INTERNET=1), in load order:
    # nftables with NAT, conntrack and masquerade, tun (the guests' taps)
    # and veth. Cached with the others, carried only when used.
    l1_net_mods=(net/netfilter/nfnetlink lib/libcrc32c net/ipv4/netfilter/nf_defrag_ipv4
        net/ipv6/netfilter/nf_defrag_ipv6 net/netfilter/nf_conntrack net/netfilter/nf_nat
        net/netfilter/nf_tables net/netfilter/nft_chain_nat net/netfilter/nft_ct
        net/netfilter/nft_masq drivers/net/tun drivers/net/veth)
    l1k="$cache_root/l1-kernel/${img_sha:0:16}-$(echo "${l1_mods[*]} ${l1_net_mods[*]}" | sha256sum | cut -c1-8)"
    if [[ ! -f "$l1k/.complete" ]]; then
        [[ "${STASIS_NO_APT:-0}" != 1 ]] \
            || prereq "L1 kernel $img_pkg not cached in $l1k and STASIS_NO_APT=1"
        mkdir -p "$cache_root/l1-kernel"
        dl="$(mktemp -d "$cache_root/l1-kernel/dl.XXXXXX")"
        log "downloading $img_pkg (L1 kernel, kvm and virtio-net modules)"
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
        for m in "${l1_mods[@]}" "${l1_net_mods[@]}"; do
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
    for m in "${l1_mods[@]}"; do
        cp "$l1k/$(basename "$m").ko" "$root/l1/"
    done
    # The VMM goes to /stasis; its libraries keep their host paths. A copy without
    # debug info is smaller to load and unpack under TCG.
    copy_with_libs "$stasis_bin"
    mv "$root$stasis_bin" "$root/stasis"
    strip --strip-debug "$root/stasis" 2>/dev/null || true
    cp "$vmlinux" "$root/vmlinux"
    if [[ "$scenario" == serve ]]; then
        # The (mostly empty) rootfs image: only its non-zero 4 KiB blocks, as
        # /l1/sparse/rootfs/{size,blk.N}; L1 rebuilds it sparse (unsparse).
        python3 - "$initramfs" "$root/l1/sparse/rootfs" <<'PY' || die "packing $initramfs failed"
import os, sys
src, dst = sys.argv[1:]
os.makedirs(dst)
B = 4096
runs = 0
with open(src, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    with open(os.path.join(dst, "size"), "w") as out:
        out.write(f"{size}\n")

    def flush(start, chunks):
        with open(os.path.join(dst, f"blk.{start}"), "wb") as out:
            out.write(b"".join(chunks))

    off = 0
    while off < size:
        try:
            data = os.lseek(f.fileno(), off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            break
        hole = os.lseek(f.fileno(), data, os.SEEK_HOLE)
        first, end = data // B, -(-hole // B)
        f.seek(first * B)
        start, chunks = None, []
        for blk in range(first, end):
            chunk = f.read(B)
            if chunk.count(0) != len(chunk):
                if start is None:
                    start = blk
                chunks.append(chunk)
            elif start is not None:
                flush(start, chunks)
                start, chunks = None, []
        if start is not None:
            flush(start, chunks)
        off = end * B
PY
        log "rootfs image: $(du -sh --apparent-size "$initramfs" | cut -f1) ($(du -sh "$root/l1/sparse/rootfs" | cut -f1) of it non-zero) from $initramfs"
    else
        cp "$initramfs" "$root/initramfs.cpio.gz"
    fi
    net_mod_names=""
    net_tools=""
    if [[ "$fake_internet" == 1 ]]; then
        for m in "${l1_net_mods[@]}"; do
            cp "$l1k/$(basename "$m").ko" "$root/l1/"
            net_mod_names+="$(basename "$m") "
        done
        for tool in nft ip nsenter dnsmasq; do
            copy_with_libs "$(command -v "$tool")"
        done
        # By path: L1's busybox sh runs its own applets (`ip`, `nsenter`)
        # before anything on PATH.
        net_tools="FI_IP=$(command -v ip) FI_NSENTER=$(command -v nsenter) FI_DNSMASQ=$(command -v dnsmasq)"
        cp "$here/fake-internet.sh" "$root/l1/fake-internet.sh"
        # dnsmasq looks its user and group up (--user=root --group=root).
        echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
        echo 'root:x:0:' >"$root/etc/group"
    fi
    for extra in ${STASIS_L1_EXTRA:-}; do
        [[ -e "$extra" ]] || prereq "STASIS_L1_EXTRA path does not exist: $extra"
        copy_with_libs "$(realpath "$extra")"
    done

    if [[ -n "${STASIS_L1_COMMAND:-}" ]]; then
        run_cmd="$STASIS_L1_COMMAND"
    elif [[ "$scenario" == pause-resume ]]; then
        run_cmd="sh /l1/pause-resume.sh"
    elif [[ "$scenario" == serve ]]; then
        run_cmd="sh /l1/serve.sh"
    else
        run_cmd="$(printf '%q ' /stasis run --kernel /vmlinux \
            --initrd /initramfs.cpio.gz --cmdline "$inner_cmdline" --mem "$inner_mem" \
            --vcpus "$inner_vcpus")"
        [[ -z "${STASIS_L1_AFTER:-}" ]] || run_cmd+=" && { $STASIS_L1_AFTER; }"
    fi
    l1_hugepages="${STASIS_L1_HUGEPAGES:-0}"
    [[ "$l1_hugepages" =~ ^[0-9]+$ ]] || { echo "run-l1: STASIS_L1_HUGEPAGES must be a whole number" >&2; exit 2; }
    inner_backing="${STASIS_INNER_BACKING:-}"
    [[ "$inner_backing" =~ ^(|auto|hugetlb|thp|4k)$ ]] \
        || { echo "run-l1: STASIS_INNER_BACKING must be auto, hugetlb, thp or 4k" >&2; exit 2; }
    paused_s="${STASIS_PR_PAUSED_S:-6}"
    [[ "$paused_s" =~ ^[0-9]+$ ]] || { echo "run-l1: STASIS_PR_PAUSED_S must be a whole number" >&2; exit 2; }
    # The init reads its parameters from this file (sourced by busybox sh).
    {
        printf 'RUN_CMD=%q\n' "$run_cmd"
        printf 'INNER_TIMEOUT=%q\n' "$inner_timeout"
        printf 'INNER_CMDLINE=%q\n' "$inner_cmdline"
        printf 'INNER_MEM=%q\n' "$inner_mem"
        printf 'INNER_VCPUS=%q\n' "$inner_vcpus"
        printf 'PAUSE_AT=%q\n' "$pause_at"
        printf 'PR_EAGER=%q\n' "$pr_eager"
        printf 'STEP_TIMEOUT=%q\n' "$step_timeout"
        printf 'PAUSED_S=%q\n' "$paused_s"
        printf 'L1_HUGEPAGES=%q\n' "$l1_hugepages"
        printf 'INNER_BACKING=%q\n' "$inner_backing"
        # serve.sh prints the launch marker itself, after its network setup.
        printf 'LAUNCH_IN_SCENARIO=%q\n' "$([[ "$scenario" == serve && -z "${STASIS_L1_COMMAND:-}" ]] && echo 1 || echo 0)"
        printf 'PR_ON_HANG=%q\n' "${STASIS_PR_ON_HANG:-}"
        printf 'SERVE_ARGS=%q\n' "${STASIS_SERVE_ARGS:-}"
        printf 'DATA_SIZE=%q\n' "${STASIS_L1_DATA_SIZE:-}"
        printf 'FAKE_INTERNET=%q\n' "$fake_internet"
        printf 'NET_MODS=%q\n' "$net_mod_names"
        printf 'NET_TOOLS=%q\n' "$net_tools"
        printf 'SERVE_LINUX_ARGS=%q\n' "${STASIS_SERVE_LINUX_ARGS---kernel /vmlinux --rootfs /rootfs.ext4}"
        [[ -z "${STASIS_LOG:-}" ]] || printf 'export STASIS_LOG=%q\n' "$STASIS_LOG"
        [[ -z "${STASIS_FAULT:-}" ]] || printf 'export STASIS_FAULT=%q\n' "$STASIS_FAULT"
    } >"$root/l1/params"

    # The pause-resume scenario, run by the L1 init in place of `stasis run`.
    cat >"$root/l1/pause-resume.sh" <<'EOF'
#!/bin/busybox sh
# Pause-resume scenario in L1 (tests/nested/run-l1.sh): run, pause to disk
# on SIGUSR1, resume in a fresh process (lazily, then eagerly), check.
. /l1/params
up() { cut -d' ' -f1 /proc/uptime; }
# ms_since T0: milliseconds of L1 uptime since T0 (as printed by up).
ms_since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%d", (b - a) * 1000 }'; }
say() { echo "pause-resume: $*"; }
verdict_fail() {
    say "FAIL: $*"
    echo "STASIS-PR-VERDICT FAIL $*"
    exit 1
}
# show FILE LABEL: print a console or log with a prefix on each line.
show() {
    echo "----- $2: $1 -----"
    [ -f "$1" ] && tr -d '\r' <"$1" | sed "s/^/[$2] /"
    echo ""
    echo "----- end of $2 -----"
}
# stuck_report LABEL PID FILE: every call (~10 s apart) says how far the step
# is; when FILE (the console) did not grow since the last call, it also lists
# the state of PID's threads (state, user and system ticks, where they sleep),
# which tells a guest that spins (R, ticks growing) from one that waits (S).
threads() {
    for t in /proc/"$1"/task/*; do
        [ -r "$t/stat" ] || continue
        echo "    $(cat "$t/comm" 2>/dev/null): $(cut -d' ' -f3,14,15 "$t/stat" 2>/dev/null) $(cat "$t/wchan" 2>/dev/null)"
    done
}
last_size=-1
stuck_report() {
    size="$(wc -c 2>/dev/null <"$3" || echo 0)"
    say "$1: console $size bytes, last line: $(tr -d '\r' 2>/dev/null <"$3" | tail -n1)"
    if [ "$size" = "$last_size" ]; then
        say "$1: no console output for ~10 s; threads of $2 (state utime stime wchan):"
        threads "$2"
    fi
    last_size="$size"
}
# on_hang PID DIR: a step ran past its limit. List PID's threads, pause the
# guest into DIR with SIGUSR1 (its vCPU, irqchip, PIT and serial state then
# show where it hangs), run STASIS_PR_ON_HANG on DIR if set, and make sure
# PID is gone.
on_hang() {
    say "step limit (${STEP_TIMEOUT}s) reached; threads of $1 (state utime stime wchan):"
    threads "$1"
    say "pausing the hung guest into $2 (SIGUSR1) to keep its state"
    kill -USR1 "$1"
    n=0
    while kill -0 "$1" 2>/dev/null && [ "$n" -lt 60 ]; do
        sleep 0.5
        n=$((n + 1))
    done
    if kill -0 "$1" 2>/dev/null; then
        say "still running 30 s after SIGUSR1; killing it"
        kill -KILL "$1"
    fi
    [ -f "$2/state.bin" ] || { say "no snapshot of the hung guest in $2"; return; }
    /stasis snapshot info "$2"
    if [ -n "${PR_ON_HANG:-}" ]; then
        say "STASIS_PR_ON_HANG: $PR_ON_HANG $2"
        sh -c "$PR_ON_HANG \"\$1\"" on-hang "$2"
    fi
}
# ticks FILE: the complete TICK lines of a console (a line cut by the pause,
# or mixed with a kernel message, does not match and is left out).
ticks() { tr -d '\r' 2>/dev/null <"$1" | grep -aE '^TICK [0-9]+ h=[0-9]+ up=[0-9]+ wall=[0-9]+\.[0-9]+ end$'; }
# check_chain: TICK lines on stdin must count up and each carry
# h(n) = (31*h(n-1) + n) mod 1000003, h(0) = 1; prints the first bad line.
check_chain() {
    awk 'BEGIN { n = 0; h = 1; bad = 0 }
        { k = $2 + 0; v = substr($3, 3) + 0
          if (k <= n) { if (!bad) print "not counting up after " n ": " $0; bad = 1; next }
          while (n < k) { n++; h = (h * 31 + n) % 1000003 }
          if (v != h) { if (!bad) print "h(" k ") should be " h ": " $0; bad = 1 } }
        END { exit bad }'
}

rm -rf /snap /snap-hung-lazy /snap-hung-eager /c1 /c2 /c3
set -- /stasis run --kernel /vmlinux --initrd /initramfs.cpio.gz --cmdline "$INNER_CMDLINE" \
    --mem "$INNER_MEM" --vcpus "$INNER_VCPUS" --console /c1 --snapshot-on-signal /snap
backing_args=""
[ -z "$INNER_BACKING" ] || backing_args="--memory-backing $INNER_BACKING"
# shellcheck disable=SC2086 # empty or two words
set -- "$@" $backing_args
# check_backing FILE WHAT: with INNER_BACKING, stasis's stderr must say it
# used that backing ("... on hugetlb memory", "... hugetlb memory").
check_backing() {
    [ -z "$INNER_BACKING" ] || [ "$INNER_BACKING" = auto ] && return 0
    grep -aqE "(on |, )$INNER_BACKING memory" "$1" \
        || verdict_fail "$2 did not run on $INNER_BACKING memory: $(grep -a 'stasis: ' "$1" | head -n1)"
    say "$2: on $INNER_BACKING memory: $(grep -aE "(on |, )$INNER_BACKING memory" "$1" | head -n1)"
}
say "run: $* (pause at TICK $PAUSE_AT, step limit ${STEP_TIMEOUT}s)"
t_run="$(up)"
# prev_b..seen_a brackets the moment the awaited TICK was printed: the last
# look that did not find it started at prev_b, the one that did ended at seen_a.
prev_b=$EPOCHREALTIME
"$@" 2>/e1 &
pid=$!
polls=0
while :; do
    b=$EPOCHREALTIME
    if ticks /c1 | grep -q "^TICK $PAUSE_AT "; then
        seen_a=$EPOCHREALTIME
        break
    fi
    prev_b=$b
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid"
        rc=$?
        show /c1 c1
        show /e1 run
        verdict_fail "stasis run exited with status $rc before the guest printed TICK $PAUSE_AT"
    fi
    if [ "$(ms_since "$t_run")" -gt "$((STEP_TIMEOUT * 1000))" ]; then
        on_hang "$pid" /snap
        wait "$pid"
        show /c1 c1
        show /e1 run
        verdict_fail "no TICK $PAUSE_AT within ${STEP_TIMEOUT}s of stasis run"
    fi
    # A sign of life every ~10 s, so that a hang shows where it is.
    polls=$((polls + 1))
    if [ $((polls % 50)) = 0 ]; then
        stuck_report "waiting for TICK $PAUSE_AT, $(ms_since "$t_run") ms" "$pid" /c1
    fi
    sleep 0.2
done
run_ms="$(ms_since "$t_run")"
say "TICK $PAUSE_AT seen after ${run_ms} ms; pausing the guest (SIGUSR1)"
say "clock: run: TICK $PAUSE_AT seen between $prev_b and $seen_a"
t_sig="$(up)"
sig_w=$EPOCHREALTIME
kill -USR1 "$pid"
wait "$pid"
rc=$?
exit_w=$EPOCHREALTIME
pause_ms="$(ms_since "$t_sig")"
say "clock: paused: SIGUSR1 at $sig_w, stasis run exited at $exit_w"
show /c1 c1
show /e1 run
[ "$rc" = 0 ] || verdict_fail "stasis run exited with status $rc after SIGUSR1, not 0"
check_backing /e1 "stasis run"
last_before="$(ticks /c1 | tail -n1 | cut -d' ' -f2)"
say "guest reached TICK $PAUSE_AT ${run_ms} ms after stasis run started; SIGUSR1 to exit took ${pause_ms} ms; last TICK before the pause: ${last_before:-<none>}"
[ -n "$last_before" ] || verdict_fail "no complete TICK line before the pause"
say "snapshot info:"
/stasis snapshot info /snap || verdict_fail "stasis snapshot info /snap failed"
ls -ls /snap
if [ "$PAUSED_S" -gt 0 ]; then
    say "the snapshot stays on disk for ${PAUSED_S}s (the clock checks need a pause longer than their slack)"
    sleep "$PAUSED_S"
fi

# resume MODE CONSOLE LABEL: resume /snap in a fresh process, check the result.
# Sets first_after and res_ms, res_first_ms (resume to its first TICK).
resume() {
    mode="$1" con="$2" label="$3"
    say "resume ($mode): /stasis resume /snap --$mode --console $con"
    t_res="$(up)"
    start_w=$EPOCHREALTIME
    prev_b=$start_w
    # With --snapshot-on-signal, a hung guest can be paused to look at it.
    # shellcheck disable=SC2086 # empty or two words
    /stasis resume /snap "--$mode" --console "$con" --snapshot-on-signal "/snap-hung-$label" \
        $backing_args 2>"/e-$label" &
    rpid=$!
    res_first_ms="none"
    hung=0
    polls=0
    last_size=-1
    while kill -0 "$rpid" 2>/dev/null; do
        if [ "$res_first_ms" = none ]; then
            b=$EPOCHREALTIME
            seen="$(ticks "$con" | head -n1 | cut -d' ' -f2)"
            if [ -n "$seen" ]; then
                seen_a=$EPOCHREALTIME
                res_first_ms="$(ms_since "$t_res")"
                say "clock: $mode: resume started at $start_w; TICK $seen seen between $prev_b and $seen_a"
            else
                prev_b=$b
            fi
        fi
        elapsed="$(ms_since "$t_res")"
        if [ "$elapsed" -gt "$((STEP_TIMEOUT * 1000))" ]; then
            hung=1
            on_hang "$rpid" "/snap-hung-$label"
            break
        fi
        # A sign of life every ~10 s, so that a hang shows where it is.
        polls=$((polls + 1))
        [ $((polls % 50)) != 0 ] || stuck_report "resume ($mode), $elapsed ms" "$rpid" "$con"
        sleep 0.2
    done
    wait "$rpid"
    rc=$?
    res_ms="$(ms_since "$t_res")"
    show "$con" "${con#/}"
    show "/e-$label" "$label"
    first_after="$(ticks "$con" | head -n1 | cut -d' ' -f2)"
    last_after="$(ticks "$con" | tail -n1 | cut -d' ' -f2)"
    say "resume ($mode): exit status $rc after ${res_ms} ms; first TICK line ${res_first_ms} ms after the start; TICKs ${first_after:-<none>}..${last_after:-<none>}"
    [ "$hung" = 0 ] || verdict_fail "$mode resume: no end within ${STEP_TIMEOUT}s (guest hung after the resume? last TICK ${last_after:-<none>})"
    [ "$rc" = 0 ] || verdict_fail "$mode resume: stasis resume exited with status $rc"
    check_backing "/e-$label" "$mode resume"
    if tr -d '\r' <"$con" | grep -aq 'Linux version'; then
        verdict_fail "$mode resume: the guest booted again instead of carrying on"
    fi
    okline="$(tr -d '\r' <"$con" | grep -a 'STASIS-LINUX-RESUME-OK' | head -n1)"
    if [ -z "$okline" ]; then
        failline="$(tr -d '\r' <"$con" | grep -a 'STASIS-LINUX-RESUME-FAIL' | head -n1)"
        verdict_fail "$mode resume: the guest did not print STASIS-LINUX-RESUME-OK (${failline:-no verdict from the guest})"
    fi
    [ -n "$first_after" ] || verdict_fail "$mode resume: no complete TICK line after the resume"
    [ "$first_after" -gt "$last_before" ] \
        || verdict_fail "$mode resume: first TICK after the resume ($first_after) is not greater than the last before the pause ($last_before)"
    chain="$( { ticks /c1; ticks "$con"; } | check_chain)" \
        || verdict_fail "$mode resume: TICK lines of the run and the resume do not form one count: $chain"
    say "resume ($mode): OK: TICK $last_before before the pause, $first_after..$last_after after; guest: $okline"
}

resume lazy /c2 lazy
lazy_summary="lazy: exit 0 in ${res_ms} ms, first TICK at ${res_first_ms} ms, TICK $last_before -> $first_after..$last_after"
eager_summary="eager: not run (STASIS_PR_EAGER=0)"
if [ "$PR_EAGER" = 1 ]; then
    resume eager /c3 eager
    eager_summary="eager: exit 0 in ${res_ms} ms, first TICK at ${res_first_ms} ms, TICK $last_before -> $first_after..$last_after"
fi
pause_line="$(grep -a 'stasis: paused into' /e1 | head -n1)"
lazy_line="$(grep -a 'stasis: resumed' /e-lazy | head -n1)"
say "timing: run to TICK $PAUSE_AT ${run_ms} ms; SIGUSR1 to exit ${pause_ms} ms; ${pause_line:-<no pause line from stasis>}"
say "timing: ${lazy_line:-<no resume line from stasis>}"
[ "$PR_EAGER" != 1 ] || say "timing: $(grep -a 'stasis: resumed' /e-eager | head -n1)"
echo "STASIS-PR-VERDICT PASS pause at TICK $last_before (${pause_ms} ms); $lazy_summary; $eager_summary"
EOF

    # The serve scenario, run by the L1 init in place of `stasis run`.
    cat >"$root/l1/serve.sh" <<'EOF'
#!/bin/busybox sh
# Serve scenario in L1 (tests/nested/run-l1.sh): network, rootfs, server.
. /l1/params
say() { echo "serve: $*"; }
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
    failover net_failover virtio_net; do
    insmod "/l1/$m.ko" || { say "FAIL: insmod $m.ko"; exit 1; }
done
n=0
while ! ip link show eth0 >/dev/null 2>&1; do
    n=$((n + 1))
    [ "$n" -lt 100 ] || { say "FAIL: no eth0 10 s after loading virtio_net"; exit 1; }
    sleep 0.1
done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
# unsparse: rebuild the image from its non-zero blocks (see run-l1.sh).
truncate -s "$(cat /l1/sparse/rootfs/size)" /rootfs.ext4 || { say "FAIL: truncate"; exit 1; }
for f in /l1/sparse/rootfs/blk.*; do
    dd if="$f" of=/rootfs.ext4 bs=4096 seek="${f##*.}" conv=notrunc 2>/dev/null \
        || { say "FAIL: writing $f into /rootfs.ext4"; exit 1; }
    rm -f "$f"
done
say "rootfs: /rootfs.ext4 $(stat -c %s /rootfs.ext4) bytes; memory: $(grep MemFree /proc/meminfo)"
mkdir -p /data
# The initramfs root is a tmpfs of half of L1's memory; with a large rootfs
# image in it, a sandbox's snapshot may not fit beside it.
if [ -n "$DATA_SIZE" ]; then
    mount -t tmpfs -o "size=$DATA_SIZE,mode=0700" tmpfs /data || { say "FAIL: mount /data"; exit 1; }
    say "/data: a tmpfs of $DATA_SIZE"
fi
export NO_COLOR=1
# --no-jail: this L1 init mounts no cgroups, and the jail is proven on the
# host by tests/jail.rs.
set -- /stasis serve --listen 0.0.0.0:3000 --data-dir /data --no-jail
# shellcheck disable=SC2086 # lists of words
set -- "$@" $SERVE_LINUX_ARGS $SERVE_ARGS
if [ "$FAKE_INTERNET" = 1 ]; then
    # The host's iproute2, nftables, nsenter and dnsmasq (in /usr) before
    # busybox's applets (in /bin).
    export PATH=/usr/sbin:/usr/bin:/sbin:/bin
    for m in $NET_MODS; do
        insmod "/l1/$m.ko" || { say "FAIL: insmod $m.ko"; exit 1; }
    done
    # shellcheck disable=SC2086 # NAME=PATH words
    env $NET_TOOLS sh /l1/fake-internet.sh up fi-up fi-inet /srv/www \
        || { say "FAIL: making the fake internet"; exit 1; }
    set -- "$@" --sandbox-uplink-netns fi-up --sandbox-dns 203.0.113.1
else
    # Sandbox networking needs nftables, which L1 then does not carry:
    # without it, serve would refuse to start (src/net), so its sandboxes go
    # without.
    set -- "$@" --no-network
fi
say "starting: $*"
echo "STASIS-L1-LAUNCH at L1 uptime $(cut -d' ' -f1 /proc/uptime)s"
"$@" &
pid=$!
echo "STASIS-L1-SERVE-STARTED pid=$pid at L1 uptime $(cut -d' ' -f1 /proc/uptime)s"
wait "$pid"
status=$?
say "stasis serve exited with status $status"
exit "$status"
EOF

    cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# L1 init (tests/nested/run-l1.sh): load KVM, run the inner VMM, report.
export PATH=/bin:/usr/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# ttyS0: this init and what it runs; ttyS1: the L1 kernel's log; ttyS2: a
# heartbeat that shows the host whether L1 still runs.
exec </dev/ttyS0 >/dev/ttyS0 2>&1
(while :; do echo "hb $(cut -d' ' -f1 /proc/uptime)" >/dev/ttyS2; sleep 5; done) &
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
    insmod "/l1/$m.ko" || finish "FAIL insmod $m.ko"
done
[ -c /dev/kvm ] || finish "FAIL no /dev/kvm after loading kvm-amd"
echo "stasis-l1: /dev/kvm ready at L1 uptime $(up)s"
if [ "$L1_HUGEPAGES" -gt 0 ]; then
    echo "$L1_HUGEPAGES" >/proc/sys/vm/nr_hugepages
    echo "stasis-l1: huge pages: $(grep -E '^HugePages_(Total|Free)' /proc/meminfo | tr -s ' ' | tr '\n' ' ')(asked for $L1_HUGEPAGES)"
fi
echo "stasis-l1: running (limit ${INNER_TIMEOUT}s): $RUN_CMD"
echo "stasis-l1: ----- inner output begins -----"
# The host side's retry classifier: this line present means stasis was started.
[ "$LAUNCH_IN_SCENARIO" = 1 ] || echo "STASIS-L1-LAUNCH at L1 uptime $(up)s"
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
    kernlog="$work/l1-kernel.log"
    hb="$work/heartbeat.log"
    : >"$kernlog"
    : >"$hb"
    log "booting L1 (qemu TCG, -cpu max, ${l1_mem} MiB, ${l1_smp} vCPU, limit ${l1_timeout}s)"
    qemu_extra=()
    [[ -z "${STASIS_L1_QEMU_ARGS:-}" ]] || read -r -a qemu_extra <<<"$STASIS_L1_QEMU_ARGS"
    net=()
    if [[ "$scenario" == serve ]]; then
        # Only the serve scenario has a host port (and a network).
        fwd="hostfwd=tcp:127.0.0.1:${host_port}-10.0.2.15:3000"
        for f in ${STASIS_L1_FWD:-}; do
            [[ "$f" =~ ^([0-9.]+):([0-9]+)-([0-9]+)$ ]] \
                || { echo "run-l1: STASIS_L1_FWD entry '$f' is not HOSTIP:HOSTPORT-L1PORT" >&2; exit 2; }
            fwd+=",hostfwd=tcp:${BASH_REMATCH[1]}:${BASH_REMATCH[2]}-10.0.2.15:${BASH_REMATCH[3]}"
        done
        # shellcheck disable=SC2054 # the commas are inside one QEMU argument
        net=(-netdev "user,id=n0,$fwd" -device virtio-net-pci,netdev=n0)
    fi
    qemu=(qemu-system-x86_64 -accel tcg -cpu max -m "$l1_mem" -smp "$l1_smp"
        -nographic -no-reboot -nodefaults
        -serial stdio -serial "file:$kernlog" -serial "file:$hb"
        -monitor "unix:$work/qemu.mon,server=on,wait=off"
        -kernel "$l1k/vmlinuz" -initrd "$work/l1.cpio"
        -append "${STASIS_L1_APPEND:-console=ttyS1 panic=-1 quiet}"
        "${net[@]}" "${qemu_extra[@]}")
    t_start=$SECONDS
    client_rc=""
    set +e
    timeout -k 10 "$l1_timeout" "${qemu[@]}" </dev/null >"$console" 2>&1 &
    qpid=$!
    tail -n +1 -f --pid="$qpid" "$console" &
    tailpid=$!
    # Watchdog: an L1 whose heartbeat goes quiet for a minute (or that wrote
    # none two minutes after the start) has stopped running; QEMU is stopped
    # then rather than at the hard timeout.
    # QEMU's monitor (HMP on a Unix socket), for the watchdog: `dump` prints
    # every vCPU's registers and local APIC; `nudge-if-halted`, if every vCPU
    # is halted with interrupts enabled (RFLAGS.IF), stops and continues the
    # machine and sends an NMI, and says which it did.
    cat >"$work/l1-monitor.py" <<'PY'
import re, socket, sys, time
sock, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sock)
def hmp(cmd):
    s.sendall(cmd.encode() + b"\n")
    time.sleep(1)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            if len(chunk) < 65536:
                break
    except socket.timeout:
        pass
    return out.decode(errors="replace")
hmp("")  # the banner
regs = hmp("info registers -a")
if mode == "dump":
    print("==== L1 vCPUs at", time.strftime("%H:%M:%S"))
    # The local APIC's IRR/ISR and timer: is an interrupt pending but
    # undelivered (a missed wake-up), or was the timer never fired?
    print(hmp("info cpus") + regs + hmp("info lapic"))
    sys.exit(0)
flags = re.findall(r"(?:RFL|EFL)=([0-9a-f]+) .*HLT=([01])", regs)
halted = bool(flags) and all(h == "1" and int(f, 16) & 0x200 for f, h in flags)
if halted:
    # A stop and a cont make the vCPU thread look at its pending interrupts
    # again (a missed wake-up); the NMI ends the HLT in any case.
    hmp("stop")
    hmp("cont")
    hmp("nmi")
    print(f"nudged: every vCPU ({len(flags)}) was halted with interrupts on (a lost timer interrupt); "
          "sent stop, cont and an NMI")
else:
    print(f"not halted with interrupts on ({len(flags)} vCPU(s) seen): no nudge")
PY
    : >"$work/nudges"
    quiet_limit="${STASIS_L1_QUIET_LIMIT:-60}"
    echo 0 >"$work/longest-quiet"
    (
        longest=0
        while kill -0 "$qpid" 2>/dev/null; do
            now=$(date +%s)
            if [[ -s "$hb" ]]; then
                quiet=$((now - $(stat -c %Y "$hb")))
                limit=$quiet_limit
                if ((quiet > longest)); then
                    longest=$quiet
                    echo "$longest" >"$work/longest-quiet"
                    ((quiet < 20)) || echo "run-l1: L1 heartbeat quiet for ${quiet}s (at $((SECONDS - t_start))s)" >&2
                    # Where L1's vCPUs are while it is quiet (QEMU's monitor).
                    ((quiet < 25 || quiet > 45)) \
                        || python3 "$work/l1-monitor.py" "$work/qemu.mon" dump >>"$work/quiet-cpus.log" 2>&1 || true
                fi
                # A lost timer interrupt (QEMU 7.2 TCG): L1's only vCPU sits
                # in HLT with interrupts on while its 5 s heartbeat is long
                # due. No guest and no stasis bug halts an idle L1 kernel that
                # has timers armed; an NMI through the monitor wakes it, and
                # its idle loop reprograms the missed timer. Once per gap.
                hb_mtime=$(stat -c %Y "$hb")
                if ((quiet >= 20)) && [[ "$hb_mtime" != "${nudged_mtime:-}" ]]; then
                    nudged_mtime=$hb_mtime
                    verdict="$(python3 "$work/l1-monitor.py" "$work/qemu.mon" nudge-if-halted 2>&1 | tail -n1)"
                    echo "run-l1: L1 heartbeat quiet for ${quiet}s: $verdict" >&2
                    if [[ "$verdict" == nudged* ]]; then
                        echo "$((SECONDS - t_start))s: quiet ${quiet}s: $verdict" >>"$work/nudges"
                    fi
                fi
            else
                quiet=$((SECONDS - t_start))
                limit=120
            fi
            if ((quiet > limit)); then
                echo "run-l1: WATCHDOG: no L1 heartbeat for ${quiet}s: L1 stopped running; stopping QEMU" >&2
                echo "$quiet" >"$work/watchdog"
                kill "$qpid" 2>/dev/null
                break
            fi
            sleep 2
        done
    ) &
    wdpid=$!
    if [[ "$scenario" == serve ]]; then
        url="http://127.0.0.1:$host_port"
        log "serve: waiting up to ${ready_timeout}s for $url/health (L1's port 3000)"
        ready=0
        while ((SECONDS - t_start < ready_timeout)) && kill -0 "$qpid" 2>/dev/null; do
            if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3).read()' \
                "$url/health" 2>/dev/null; then
                ready=1
                break
            fi
            sleep 1
        done
        if ((ready)); then
            log "serve: $url/health answered $((SECONDS - t_start))s after L1 started; client: $STASIS_SERVE_CLIENT"
            left=$((l1_timeout - (SECONDS - t_start) - 15))
            ((left > 10)) || left=10
            # The QEMU process (the child of `timeout`), for clients that
            # measure the host CPU it gets.
            qemu_pid="$(cat "/proc/$qpid/task/$qpid/children" 2>/dev/null | awk '{print $1}' || true)"
            STASIS_L1_URL="$url" STASIS_L1_QEMU_PID="$qemu_pid" \
                timeout -k 10 "$left" bash -c "$STASIS_SERVE_CLIENT" </dev/null 2>&1
            client_rc=$?
            log "serve: the client exited with status $client_rc"
        else
            log "serve: $url/health did not answer within ${ready_timeout}s"
        fi
        t_end=$(date +%s)
        kill "$qpid" 2>/dev/null
        wait "$qpid"
        qemu_rc=$?
    else
        wait "$qpid"
        qemu_rc=$?
        t_end=$(date +%s)
    fi
    kill "$wdpid" 2>/dev/null
    wait "$wdpid" "$tailpid"
    set -e
    t_total=$((SECONDS - t_start))

    # --- verdict -------------------------------------------------------------
    # Console lines end in \r\n; strip the \r before matching.
    clean="$work/console.clean"
    tr -d '\r' <"$console" >"$clean"
    exit_line="$(grep -a '^STASIS-L1-EXIT ' "$clean" | tail -n1 || true)"
    result_line="$(grep -a '^STASIS-L1-RESULT ' "$clean" | tail -n1 || true)"
    # The marker counts only inside the inner VMM's output.
    inner="$work/inner.clean"
    sed -n '/^stasis-l1: ----- inner output begins/,/^stasis-l1: ----- inner output ends/p' \
        "$clean" >"$inner"
    marker_line="$(grep -a "$marker" "$inner" | head -n1 || true)"
    verdict_line="$(grep -a '^STASIS-PR-VERDICT ' "$inner" | tail -n1 || true)"

    # Did the emulated machine itself fail? Only evidence that cannot come
    # from stasis counts (see "Exit status" above): L1 failed before it
    # launched stasis, or QEMU ended abnormally without the harness stopping
    # it. The L1 kernel's complaints and the heartbeat are shown as health
    # but never make a failure an L1 fault: a spinning inner guest (a stasis
    # bug) causes them too.
    stopped_by_harness=no
    if ((qemu_rc == 124 || qemu_rc == 137)) || [[ -f "$work/watchdog" || "$scenario" == serve ]]; then
        stopped_by_harness=yes
    fi
    l1_fault=""
    if ! grep -aq '^STASIS-L1-LAUNCH' "$clean"; then
        l1_fault="L1 failed before it launched stasis (no STASIS-L1-LAUNCH line; qemu exit $qemu_rc)"
    elif [[ "$stopped_by_harness" == no ]] && ((qemu_rc != 0)); then
        l1_fault="QEMU itself ended abnormally after stasis started: exit status $qemu_rc"
    fi
    l1_health=""
    kern_bad="$(tr -d '\r' <"$kernlog" | grep -aE 'soft lockup|hard LOCKUP|rcu.*stall|Kernel panic|Oops|general protection fault|BUG: |watchdog: ' | head -n1 || true)"
    hb_age=$((t_end - $(stat -c %Y "$hb")))
    if [[ -n "$kern_bad" ]]; then
        l1_health="the L1 kernel reported: $kern_bad"
    elif [[ ! -s "$hb" ]]; then
        l1_health="L1 never wrote a heartbeat"
    elif [[ -f "$work/watchdog" ]]; then
        l1_health="L1 stopped running: no heartbeat for $(cat "$work/watchdog")s (the watchdog stopped QEMU)"
    elif ((hb_age > 45)); then
        l1_health="L1 stopped running: its last heartbeat came ${hb_age}s before the end"
    fi

    if [[ -s "$work/quiet-cpus.log" ]]; then
        echo "----- L1 vCPUs while its heartbeat was quiet (QEMU monitor) -----"
        grep -aE '^====|CPU #|RIP=|CPL=|^CS |HLT|EFER|IRR|ISR|LVTT|Timer|timer' "$work/quiet-cpus.log" | head -n 80
        echo "----- end -----"
    fi
    if [[ -s "$kernlog" ]]; then
        echo "----- L1 kernel log (ttyS1) -----"
        tr -d '\r' <"$kernlog" | tail -n 200 | sed 's/^/[L1-kernel] /'
        echo "----- end of L1 kernel log -----"
    fi
    qemu_note=""
    ((qemu_rc != 124 && qemu_rc != 137)) || qemu_note=" (hard timeout ${l1_timeout}s)"
    [[ "$scenario" != serve ]] || qemu_note=" (stopped after the client)"
    echo "run-l1: ===== summary ====="
    echo "run-l1: qemu exit: $qemu_rc$qemu_note"
    echo "run-l1: qemu stopped by the harness: $stopped_by_harness"
    echo "run-l1: L1 heartbeats: $(wc -l <"$hb"), the last ${hb_age}s before the end: $(tail -n1 "$hb" | tr -d '\r'); longest gap seen ~$(cat "$work/longest-quiet")s (every 5 s expected)"
    echo "run-l1: L1 health: ${l1_health:-no complaint from the L1 kernel, heartbeat regular}"
    if [[ -s "$work/nudges" ]]; then
        echo "run-l1: L1 nudges: $(wc -l <"$work/nudges") (L1 halted with interrupts on and its timer interrupt lost, a QEMU TCG fault; an NMI woke it):"
        sed 's/^/run-l1:   /' "$work/nudges"
    else
        echo "run-l1: L1 nudges: 0"
    fi
    if [[ "$scenario" == serve ]]; then
        echo "run-l1: server: ${marker_line:-<never started>}"
        echo "run-l1: client exit: ${client_rc:-<not run: the server never answered /health>}"
    else
        echo "run-l1: L1 result: ${result_line:-<none>}"
        echo "run-l1: inner exit: ${exit_line:-<none>}"
        echo "run-l1: inner marker: ${marker_line:-<not seen>}"
    fi
    if [[ "$scenario" == pause-resume ]]; then
        grep -a '^pause-resume: timing: ' "$inner" | sed 's/^/run-l1: /' || true
        echo "run-l1: pause-resume verdict: ${verdict_line:-<none>}"
    fi
    echo "run-l1: total wall time: ${t_total}s"
    fail=""
    if [[ "$scenario" == serve ]]; then
        serve_fail="$(grep -a '^serve: FAIL' "$inner" | head -n1 || true)"
        if [[ -n "$serve_fail" ]]; then
            fail="L1 setup for the server failed: ${serve_fail#serve: }"
        elif [[ -z "$marker_line" ]]; then
            fail="L1 never started stasis serve"
        elif [[ -z "$client_rc" ]]; then
            fail="the server never answered GET /health through the forwarded port within ${ready_timeout}s"
        elif [[ "$client_rc" != 0 ]]; then
            fail="the client exited with status $client_rc"
        fi
    elif [[ -z "$result_line" ]]; then
        fail="L1 never reported a result (qemu exit $qemu_rc)"
    elif [[ "$result_line" != "STASIS-L1-RESULT DONE" ]]; then
        fail="L1 setup failed: ${result_line#STASIS-L1-RESULT }"
    elif [[ "$exit_line" != "STASIS-L1-EXIT status=0 "* ]]; then
        fail="inner VMM did not exit cleanly: ${exit_line:-<no exit line>}"
    elif [[ "$expect_marker" == 1 && -z "$marker_line" ]]; then
        fail="the inner guest never printed $marker"
    elif [[ "$scenario" == pause-resume && -z "${STASIS_L1_COMMAND:-}" \
        && "$verdict_line" != "STASIS-PR-VERDICT PASS"* ]]; then
        fail="pause-resume: ${verdict_line:-no verdict from the scenario}"
    fi
    if [[ -n "$fail" && -n "$l1_fault" ]]; then
        echo "run-l1: L1 FAULT: $l1_fault"
        echo "run-l1: FAIL (L1 fault: the emulated machine failed, not stasis): $fail"
        exit 3
    fi
    if [[ -n "$fail" ]]; then
        [[ -z "$l1_health" ]] \
            || echo "run-l1: note: L1 also reported ($l1_health); that is not evidence against the emulated machine alone (a spinning guest causes it too), so this is a FAILURE, not an L1 fault"
        echo "run-l1: FAIL: $fail"
        exit 1
    fi
    echo "run-l1: PASS"
}

main "$@"; exit $?  # (one line: bash has read it whole before main runs, so editing this file meanwhile is harmless)
