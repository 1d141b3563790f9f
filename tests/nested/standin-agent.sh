#!/bin/sh
# Stand-in agent for tests/linux_rootfs.rs: exits once (init must restart
# it), then checks the image from inside and resets the guest.
n=$(cat /run/standin-count 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" >/run/standin-count
if [ "$n" -lt 2 ]; then
    echo "STANDIN start $n args=$*"
    exit 3
fi
echo "STANDIN checks uid=$(id -u) args=$* user=$(grep '^user:' /etc/passwd | cut -d: -f3,4,6) home=$(stat -c %u:%g /home/user) tmp=$(stat -c %a /tmp) root=$(stat -c %a /root) pts=$(grep -c ' /dev/pts devpts ' /proc/mounts) shm=$(grep -c ' /dev/shm tmpfs ' /proc/mounts) lo=$(ip -o link show lo | grep -c 'UP') host=$(hostname) write=$(echo ok >/root/w && cat /root/w) free_kib=$(df -k / | awk 'NR == 2 { print $4 }') end"
su user -c 'echo "STANDIN user uid=$(id -u) home=$HOME write=$(touch /home/user/x && echo ok) bash=$(bash -c "echo ok") end"'
# The --python image: Debian's python3 (with its stdlib) and bash, as the user.
su user -c 'echo "STANDIN python py=$(python3 -c "import json, sqlite3, ssl; print(json.dumps(sum(range(10))))" 2>&1 | tr " " _) bashv=$(bash -c "echo \${BASH_VERSION:-none}" | cut -d. -f1) end"'
reboot -f
