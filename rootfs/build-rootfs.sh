#!/usr/bin/env bash
# Build a sandbox template's root filesystem: an ext4 image (the read-only
# base disk that each sandbox gets a copy-on-write overlay of) with Debian's
# busybox-static as its userland, an init that starts the in-guest agent, and
# the agent binary. Cached by content hash.
#
# Usage: rootfs/build-rootfs.sh [--python] AGENT_BIN
#   AGENT_BIN  a statically linked stasis-envd (or, until it exists, any
#              static stand-in: the image boots without it and init keeps
#              restarting whatever is at /usr/local/bin/stasis-envd).
#   --python   the richer template: Debian's python3 and bash (and the
#              libraries they need) too, from `apt-get download` of the
#              dependency closure (no maintainer scripts run; needs the apt
#              lists and the Debian mirror). Busybox fills in the other tools.
# Env:
#   STASIS_CACHE            cache root (default: $HOME/.cache/stasis)
#   STASIS_NO_APT           1: never call apt-get; fail with a hint instead
#   STASIS_ROOTFS_FREE_MIB  free space left in the filesystem (512)
#
# Output: the last line on stdout is the absolute path of the image, at
#   $STASIS_CACHE/rootfs/<hash>/rootfs.ext4
# where <hash> covers this script, busybox, the agent, the free space and (with
# --python) the exact Debian package versions. The
# image is sparse: it takes little more disk than its contents.
# Exit status: 0 built or cached, 1 failed, 2 a prerequisite is missing.
#
# Boot it with this kernel command line (plus the VMM's virtio_mmio.device=):
#   console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4
# What the guest's /sbin/init does (busybox sh, PID 1):
#   - mounts proc, sysfs, devtmpfs, devpts (/dev/pts, ptmx 0666), tmpfs on
#     /dev/shm, /tmp and /run; remounts / read-write; brings up lo
#     (127.0.0.1 and ::1); sets the hostname from /etc/hostname.
#   - prints "STASIS-ROOTFS-INIT-OK uptime=... root=... agent=..." on the
#     console, then runs `/usr/local/bin/stasis-envd --vsock` as root and
#     restarts it whenever it exits ("stasis-init: agent exited ...; restart
#     N" on the console, 1 s apart). As PID 1 it also reaps orphans.
#   - users: root (0, /root) and user (1000, /home/user, groups user),
#     shell /bin/sh. Without --python, /bin/bash is a small wrapper around
#     busybox sh for callers that insist on bash (`bash -l -c CMD`).
#   - stasis.init=shell on the kernel command line: a shell on the console
#     instead of the agent (debugging).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/build-rootfs.sh"
setup="$here/init-setup.sh"
cache_root="${STASIS_CACHE:-$HOME/.cache/stasis}"
rcache="$cache_root/rootfs"
busybox=/bin/busybox

log() { echo "rootfs/build-rootfs.sh: $*" >&2; }
die() { echo "rootfs/build-rootfs.sh: ERROR: $*" >&2; exit 1; }
# Exit status 2: a prerequisite is missing (tests may report a skip).
prereq() { echo "rootfs/build-rootfs.sh: PREREQUISITE MISSING: $*" >&2; exit 2; }

# The body is one function so that bash parses it whole before running it:
# editing this file while it runs cannot derail the run.
main() {
    python=0
    if [[ "${1:-}" == --python ]]; then
        python=1
        shift
    fi
    (($# == 1)) || { echo "usage: $0 [--python] AGENT_BIN" >&2; exit 2; }
    [[ -f "$1" ]] || prereq "no such agent binary: $1"
    agent="$(realpath "$1")"
    free_mib="${STASIS_ROOTFS_FREE_MIB:-512}"
    [[ "$free_mib" =~ ^[0-9]+$ ]] || die "STASIS_ROOTFS_FREE_MIB must be a number of MiB"

    # --- prerequisites -------------------------------------------------------
    need_pkgs=()
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
        || need_pkgs+=(busybox-static)
    command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
    command -v debugfs >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
    if ((${#need_pkgs[@]})); then
        if [[ "${STASIS_NO_APT:-0}" == 1 || "$(id -u)" != 0 ]]; then
            prereq "packages ${need_pkgs[*]}; install them with: apt-get install -y ${need_pkgs[*]}"
        fi
        log "installing missing packages: ${need_pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${need_pkgs[@]}" >&2 || prereq "apt-get install ${need_pkgs[*]} failed"
    fi
    [[ -x "$busybox" ]] || die "$busybox missing although busybox-static is installed"
    if command -v file >/dev/null 2>&1; then
        file -L "$busybox" | grep -q 'dynamically linked' \
            && die "$busybox is dynamically linked; install busybox-static"
        # The guest has no shared libraries: a dynamic agent cannot start there.
        file -L "$agent" | grep -q 'dynamically linked' \
            && die "$agent is dynamically linked; the guest has no shared libraries" \
                "(build it with: cargo rustc --release --bin stasis-envd -- -C target-feature=+crt-static)"
    fi

    # --- Debian packages (--python): the dependency closure, as if on an empty system
    debs=()
    deb_list=""
    apt_dir=""
    trap 'rm -rf "${stage:-}" "$apt_dir"' EXIT
    if ((python)); then
        apt_dir="$(mktemp -d "${TMPDIR:-/tmp}/stasis-rootfs-apt.XXXXXX")"
        mkdir -p "$apt_dir/cache/archives/partial"
        : >"$apt_dir/status"
        apt_opts=(-q -y -o "Dir::State::status=$apt_dir/status" -o "Dir::Cache=$apt_dir/cache"
            -o APT::Install-Recommends=false -o Debug::NoLocking=1)
        [[ "$(id -u)" != 0 ]] || apt_opts+=(-o APT::Sandbox::User=root)
        deb_list="$(apt-get install --print-uris "${apt_opts[@]}" python3 bash 2>&1 \
            | grep "^'" | LC_ALL=C sort)" \
            || prereq "apt-get cannot resolve python3 and bash (run apt-get update)"
        [[ -n "$deb_list" ]] || prereq "apt-get lists no packages for python3 and bash (run apt-get update)"
    fi

    # --- cache lookup --------------------------------------------------------
    hash="$( { sha256sum "$self" "$setup" "$busybox" "$agent" | cut -d' ' -f1; echo "free=$free_mib"
        echo "$deb_list"; } | sha256sum | cut -c1-16)"
    out_dir="$rcache/$hash"
    out="$out_dir/rootfs.ext4"
    if [[ -s "$out" ]]; then
        log "cached: $out"
        echo "$out"
        exit 0
    fi
    mkdir -p "$rcache"

    # --- staging tree --------------------------------------------------------
    stage="$(mktemp -d "$rcache/stage.XXXXXX")"
    root="$stage/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,usr/local/sbin,dev,proc,sys} \
        "$root"/{tmp,run,etc,root,home/user,mnt,var/log,var/tmp,lib}
    if ((python)); then
        log "downloading $(wc -l <<<"$deb_list") Debian packages (python3, bash and their dependencies)"
        (cd "$apt_dir/cache/archives" && apt-get install --download-only "${apt_opts[@]}" python3 bash >&2) \
            || die "apt-get --download-only python3 bash failed"
        debs=("$apt_dir"/cache/archives/*.deb)
        for deb in "${debs[@]}"; do
            dpkg -x "$deb" "$root" || die "dpkg -x $deb failed"
        done
        # The packages' documentation is of no use in a sandbox.
        rm -rf "$root"/usr/share/{doc,man,info,lintian}
        log "unpacked ${#debs[@]} packages: $(du -sh "$root" | cut -f1)"
    fi
    # Files of ours are written after removing what may be there: a package's
    # (absolute) symlink must not lead a write out of the staging tree.
    put() { rm -f "$root/$1" && cat >"$root/$1"; }
    rm -f "$root/bin/busybox"
    cp "$busybox" "$root/bin/busybox"
    if [[ ! -e "$root/bin/bash" ]]; then
        put bin/bash <<'EOF'
#!/bin/sh
# Not bash: busybox sh, for callers that run `bash -l -c CMD`.
exec /bin/sh "$@"
EOF
        chmod 0755 "$root/bin/bash"
    fi
    rm -f "$root/usr/local/bin/stasis-envd"
    cp "$agent" "$root/usr/local/bin/stasis-envd"
    # Debug info only makes the image bigger (a script stand-in is left alone).
    strip --strip-debug "$root/usr/local/bin/stasis-envd" 2>/dev/null || true
    chmod 0755 "$root/usr/local/bin/stasis-envd"

    # --- /etc ------------------------------------------------------------------
    echo stasis | put etc/hostname
    put etc/hosts <<'EOF'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
127.0.1.1	stasis
EOF
    put etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    put etc/group <<'EOF'
root:x:0:
tty:x:5:
user:x:1000:
nogroup:x:65534:
EOF
    put etc/shadow <<'EOF'
root:*:19000:0:99999:7:::
user:*:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOF
    chmod 0640 "$root/etc/shadow"
    printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' | put etc/nsswitch.conf
    put etc/resolv.conf </dev/null
    put etc/profile <<'EOF'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LANG=C.UTF-8
[ -n "$HOME" ] || export HOME=/root
EOF
    if ((python)); then
        echo 'stasis sandbox (busybox, Debian python3 and bash)' | put etc/issue
    else
        echo 'stasis sandbox (busybox)' | put etc/issue
    fi

    # --- init ----------------------------------------------------------------
    put sbin/init <<'EOF'
#!/bin/busybox sh
# stasis sandbox init (rootfs/build-rootfs.sh): mount the usual filesystems,
# then run the agent and restart it whenever it exits. PID 1 never exits.
. /etc/stasis/init-setup.sh

agent=/usr/local/bin/stasis-envd
up="$(cut -d' ' -f1 /proc/uptime)"
echo "STASIS-ROOTFS-INIT-OK uptime=${up}s root=$(grep ' / ' /proc/mounts | cut -d' ' -f1,3,4 | tr ' ' ,)" \
    "cpus=$(grep -c '^processor' /proc/cpuinfo) agent=$([ -x "$agent" ] && echo present || echo missing)"

if [ "$mode" = shell ]; then
    echo "stasis-init: stasis.init=shell: a shell on the console instead of the agent"
    while true; do
        setsid -c /bin/sh -l
    done
fi

# The agent's supervisor. While `wait` waits for the agent, busybox sh also
# reaps every other child PID 1 inherits (orphans), so no zombies pile up.
restarts=0
while true; do
    if [ -x "$agent" ]; then
        cd /
        "$agent" --vsock &
        pid=$!
        echo "stasis-init: agent started (pid $pid)"
        wait "$pid"
        status=$?
    else
        status=127
    fi
    restarts=$((restarts + 1))
    echo "stasis-init: agent exited with status $status at uptime $(cut -d' ' -f1 /proc/uptime)s; restart $restarts in 1 s"
    sleep 1
done
EOF
    chmod 0755 "$root/sbin/init"
    mkdir -p "$root/etc/stasis"
    put etc/stasis/init-setup.sh <"$setup"

    # Each busybox applet at its usual place (bin/ls, sbin/ip, usr/bin/awk,
    # ...), except where a file of ours is (sbin/init). Last, and relative: a
    # file written later through an absolute link would land on the host.
    while read -r applet_path; do
        name="$(basename "$applet_path")"
        found=0
        for d in bin sbin usr/bin usr/sbin; do
            [[ -e "$root/$d/$name" || -L "$root/$d/$name" ]] && found=1
        done
        ((found == 0)) || continue
        mkdir -p "$root/$(dirname "$applet_path")"
        ln -s "$(realpath --relative-to="$root/$(dirname "$applet_path")" "$root/bin/busybox")" \
            "$root/$applet_path"
    done < <("$busybox" --list-full)

    # The dynamic loader's cache, for the Debian libraries (root only: it chroots).
    if ((python)) && [[ "$(id -u)" == 0 ]]; then
        ldconfig -r "$root" || die "ldconfig -r $root failed"
    fi

    # --- the image -------------------------------------------------------------
    content_kib="$(du -sk --apparent-size "$root" | cut -f1)"
    # Contents, the free space asked for, and room for ext4's own metadata.
    size_mib=$(((content_kib / 1024) * 5 / 4 + free_mib + 32))
    img="$stage/rootfs.ext4"
    log "making ext4 image: ${size_mib} MiB (contents $((content_kib / 1024)) MiB, free ~${free_mib} MiB)"
    mkfs.ext4 -q -F -L stasis-root -m 0 -E root_owner=0:0 -d "$root" "$img" "${size_mib}M" >&2 \
        || die "mkfs.ext4 -d failed"

    # Owners inside the image do not depend on who built it: root owns
    # everything but the user's home. debugfs edits the image without mounting.
    cmds="$stage/debugfs.cmds"
    (cd "$root" && find . -mindepth 1) | while read -r p; do
        p="${p#.}"
        case "$p" in
        /home/user | /home/user/*) printf 'sif %s uid 1000\nsif %s gid 1000\n' "$p" "$p" ;;
        *) printf 'sif %s uid 0\nsif %s gid 0\n' "$p" "$p" ;;
        esac
    done >"$cmds"
    # /tmp, /var/tmp: sticky and world-writable; /etc/shadow readable by root only.
    printf 'sif /tmp mode 041777\nsif /var/tmp mode 041777\nsif /root mode 040700\n' >>"$cmds"
    debugfs -w -f "$cmds" "$img" >"$stage/debugfs.log" 2>&1 \
        || { tail -n 20 "$stage/debugfs.log" >&2; die "debugfs could not set owners"; }
    # Besides its banner and the echo of each command, debugfs prints only errors.
    if grep -v '^debugfs[ :]' "$stage/debugfs.log" | grep -q .; then
        grep -v '^debugfs[ :]' "$stage/debugfs.log" | head -n 10 >&2
        die "debugfs reported errors while setting owners"
    fi
    e2fsck -fn "$img" >"$stage/fsck.log" 2>&1 \
        || { tail -n 20 "$stage/fsck.log" >&2; die "e2fsck found problems in the new image"; }

    mkdir -p "$out_dir.tmp.$$"
    mv "$img" "$out_dir.tmp.$$/rootfs.ext4"
    {
        echo "busybox $(sha256sum "$busybox" | cut -d' ' -f1)"
        echo "agent $(sha256sum "$agent" | cut -d' ' -f1) $agent"
        echo "size_mib $size_mib"
        [[ -z "$deb_list" ]] || awk '{ print "deb " $2 }' <<<"$deb_list"
    } >"$out_dir.tmp.$$/manifest"
    rm -rf "$out_dir"
    mv "$out_dir.tmp.$$" "$out_dir"
    log "built: $out (${size_mib} MiB, $(du -h "$out" | cut -f1) on disk)"
    echo "$out"
}

main "$@"
