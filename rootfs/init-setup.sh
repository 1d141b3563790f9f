# Sourced by every sandbox image's /sbin/init (busybox sh or bash), installed
# as /etc/stasis/init-setup.sh: mounts the usual filesystems, points the
# console at init, brings up lo, writes /etc/resolv.conf from the kernel's
# boot-time network configuration (if any) and reads `stasis.init=` from the kernel
# command line into $mode (agent, or shell for debugging).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=linux
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q " /dev devtmpfs " /proc/mounts || mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -o remount,rw / || echo "stasis-init: WARNING: cannot remount / read-write"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
hostname -F /etc/hostname
ip link set lo up || echo "stasis-init: WARNING: cannot bring up lo"
# A networked sandbox's kernel configured eth0 from `ip=` and lists the
# resolver it was given in /proc/net/pnp; programs read /etc/resolv.conf.
if grep -q '^nameserver' /proc/net/pnp 2>/dev/null; then
    grep '^nameserver' /proc/net/pnp >/etc/resolv.conf ||
        echo "stasis-init: WARNING: cannot write /etc/resolv.conf"
fi

mode=agent
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    stasis.init=*) mode="${arg#stasis.init=}" ;;
    esac
done
