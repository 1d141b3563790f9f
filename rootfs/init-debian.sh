#!/bin/bash
# stasis sandbox init for the Debian images (rootfs/build-image.sh), PID 1:
# mounts the usual filesystems, then runs the agent (and, in the
# code-interpreter image, the code-interpreter server on port 49999 as
# `user`), restarting each whenever it exits. PID 1 never exits.
. /etc/stasis/init-setup.sh

agent=/usr/local/bin/stasis-envd
interpreter=/usr/local/lib/stasis/stasis_interpreter.py
up="$(cut -d' ' -f1 /proc/uptime)"
echo "STASIS-ROOTFS-INIT-OK uptime=${up}s root=$(grep ' / ' /proc/mounts | cut -d' ' -f1,3,4 | tr ' ' ,)" \
    "cpus=$(grep -c '^processor' /proc/cpuinfo) agent=$([ -x "$agent" ] && echo present || echo missing)" \
    "interpreter=$([ -f "$interpreter" ] && echo present || echo absent)"

if [ "$mode" = shell ]; then
    echo "stasis-init: stasis.init=shell: a shell on the console instead of the agent"
    while true; do
        setsid -c /bin/bash -l
    done
fi

# supervise NAME CMD...: runs CMD, restarts it 1 s after it exits.
supervise() {
    local name=$1 restarts=0 status
    shift
    while true; do
        (cd / && exec "$@") &
        echo "stasis-init: $name started (pid $!)"
        wait $!
        status=$?
        restarts=$((restarts + 1))
        echo "stasis-init: $name exited with status $status at uptime $(cut -d' ' -f1 /proc/uptime)s; restart $restarts in 1 s"
        sleep 1
    done
}

supervise agent "$agent" --vsock &
if [ -f "$interpreter" ]; then
    supervise interpreter setpriv --reuid=1000 --regid=1000 --init-groups --reset-env \
        env HOME=/home/user USER=user LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        python3 "$interpreter" --cwd /home/user &
fi
# PID 1 reaps orphans while it waits.
while true; do
    wait
done
