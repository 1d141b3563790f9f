#!/usr/bin/env bash
# Build the stasis minimal guest kernel (an ELF vmlinux) from Debian's
# linux-source-6.1 package and kernel/config, cached by content hash.
#
# Usage: kernel/build.sh
# Env:
#   STASIS_CACHE   cache root (default: $HOME/.cache/stasis)
#   STASIS_NO_APT  set to 1 to never call apt-get; fail with a hint instead
#   JOBS           parallel make jobs (default: nproc)
#
# Output: the last line on stdout is the absolute path of vmlinux, at
#   $STASIS_CACHE/kernel/<hash>/vmlinux
# where <hash> covers kernel/config, this script and the linux-source package
# version. Progress goes to stderr, the full make output to
# $STASIS_CACHE/kernel/<hash>.log.
# Exit status: 0 built or cached, 1 configuration or build failed, 2 a
# prerequisite is missing (and could not be installed).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/config"
self="$here/build.sh"
cache_root="${STASIS_CACHE:-$HOME/.cache/stasis}"
kcache="$cache_root/kernel"
src_pkg="linux-source-6.1"
src_tar="/usr/src/linux-source-6.1.tar.xz"

log() { echo "kernel/build.sh: $*" >&2; }
die() { echo "kernel/build.sh: ERROR: $*" >&2; exit 1; }
# Exit status 2: a prerequisite is missing (tests may report a skip).
prereq() { echo "kernel/build.sh: PREREQUISITE MISSING: $*" >&2; exit 2; }

# The body is one function so that bash parses it whole before running it:
# editing this file while it runs cannot derail the run.
main() {
    [[ -f "$fragment" ]] || die "missing config fragment $fragment"

    # --- prerequisites -------------------------------------------------------
    need_pkgs=()
    dpkg-query -W -f='${Status}' "$src_pkg" 2>/dev/null | grep -q 'install ok installed' \
        || need_pkgs+=("$src_pkg")
    for tool_pkg in make:make gcc:gcc bc:bc flex:flex bison:bison xz:xz-utils \
        perl:perl; do
        command -v "${tool_pkg%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool_pkg#*:}")
    done
    for hdr_pkg in libelf.h:libelf-dev openssl/ssl.h:libssl-dev; do
        [[ -f "/usr/include/${hdr_pkg%%:*}" ]] || need_pkgs+=("${hdr_pkg#*:}")
    done
    if ((${#need_pkgs[@]})); then
        if [[ "${STASIS_NO_APT:-0}" == 1 || "$(id -u)" != 0 ]]; then
            prereq "packages ${need_pkgs[*]}; install them with: apt-get install -y ${need_pkgs[*]}"
        fi
        log "installing missing packages: ${need_pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${need_pkgs[@]}" >&2 || prereq "apt-get install ${need_pkgs[*]} failed"
    fi
    [[ -f "$src_tar" ]] || die "$src_pkg is installed but $src_tar is missing"
    src_ver="$(dpkg-query -W -f='${Version}' "$src_pkg")"

    # --- cache lookup --------------------------------------------------------
    hash="$( { sha256sum "$fragment" "$self" | cut -d' ' -f1; echo "$src_pkg=$src_ver"; } \
        | sha256sum | cut -c1-16)"
    out_dir="$kcache/$hash"
    if [[ -s "$out_dir/vmlinux" ]]; then
        log "cached: $out_dir/vmlinux"
        echo "$out_dir/vmlinux"
        exit 0
    fi

    mkdir -p "$kcache"
    # One builder at a time (parallel test runs share the cache).
    exec 9>"$kcache/.lock"
    flock 9
    if [[ -s "$out_dir/vmlinux" ]]; then
        log "cached (built by a concurrent run): $out_dir/vmlinux"
        echo "$out_dir/vmlinux"
        exit 0
    fi

    # --- source tree (shared by all configs of one package version) ----------
    src_dir="$kcache/src-$src_ver"
    if [[ ! -f "$src_dir/.stasis-extracted" ]]; then
        log "extracting $src_tar into $src_dir"
        rm -rf "$src_dir" "$src_dir.tmp"
        mkdir -p "$src_dir.tmp"
        tar -xf "$src_tar" -C "$src_dir.tmp" --strip-components=1
        touch "$src_dir.tmp/.stasis-extracted"
        mv "$src_dir.tmp" "$src_dir"
    fi

    # --- configure and build (out of tree) -----------------------------------
    build_dir="$kcache/build-$hash"
    rm -rf "$build_dir"
    mkdir -p "$build_dir"
    build_log="$kcache/$hash.log"
    : >"$build_log"
    jobs="${JOBS:-$(nproc)}"
    mk() { nice -n 10 make -C "$src_dir" O="$build_dir" ARCH=x86_64 "$@"; }

    log "configuring (tinyconfig + $fragment), log: $build_log"
    {
        mk tinyconfig
        "$src_dir/scripts/kconfig/merge_config.sh" -m -O "$build_dir" \
            "$build_dir/.config" "$fragment"
        mk olddefconfig
    } >>"$build_log" 2>&1 || { tail -n 40 "$build_log" >&2; die "kernel configuration failed"; }

    # Every option the fragment sets must have survived olddefconfig.
    missing=()
    while IFS= read -r line; do
        case "$line" in
        CONFIG_*=*)
            if ! grep -qxF -- "$line" "$build_dir/.config"; then
                got="$(grep -E "^(# )?${line%%=*}[= ]" "$build_dir/.config" || echo unset)"
                missing+=("want '$line', got '$got'")
            fi
            ;;
        "# CONFIG_"*" is not set")
            opt="${line#\# }"
            opt="${opt%% *}"
            if grep -qE "^$opt=[ym]" "$build_dir/.config"; then
                missing+=("want '$opt' off, got '$(grep -E "^$opt=" "$build_dir/.config")'")
            fi
            ;;
        esac
    done <"$fragment"
    if ((${#missing[@]})); then
        printf '  %s\n' "${missing[@]}" >&2
        die "final .config does not match kernel/config (${#missing[@]} options above);" \
            "an option's dependencies are probably missing from the fragment"
    fi
    log "config verified: every option in the fragment is in the final .config"

    log "building vmlinux with $jobs jobs (nice 10); this takes several minutes"
    start=$SECONDS
    mk -j"$jobs" vmlinux >>"$build_log" 2>&1 \
        || { tail -n 60 "$build_log" >&2; die "kernel build failed; full log: $build_log"; }
    log "vmlinux built in $((SECONDS - start)) s"

    # PVH entry note present? (direct ELF boot by QEMU and PVH-capable VMMs)
    if command -v readelf >/dev/null 2>&1; then
        readelf -n "$build_dir/vmlinux" | grep -q 'Xen' \
            || die "vmlinux has no PVH (Xen ELF) note although CONFIG_PVH=y"
    fi

    tmp_out="$out_dir.tmp.$$"
    rm -rf "$tmp_out"
    mkdir -p "$tmp_out"
    cp "$build_dir/vmlinux" "$tmp_out/vmlinux"
    cp "$build_dir/.config" "$tmp_out/config"
    cp "$build_dir/System.map" "$tmp_out/System.map"
    echo "$src_pkg=$src_ver" >"$tmp_out/source-version"
    rm -rf "$out_dir"
    mv "$tmp_out" "$out_dir"
    rm -rf "$build_dir"
    log "done: $out_dir/vmlinux ($(du -h "$out_dir/vmlinux" | cut -f1))"
    echo "$out_dir/vmlinux"
}

main "$@"
