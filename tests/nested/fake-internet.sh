#!/bin/sh
# A "fake internet" for the networking proofs of Linux sandboxes (issue 11):
# two network namespaces that stand in for the host's uplink and for the
# internet behind it, so that a guest's packets never reach any address
# outside namespaces this script made.
#
#   stasis sandbox namespaces ── sv<hex> veths ── UPLINK (203.0.113.2/24 on wan0,
#                                                  default route via .1; stasis's
#                                                  NAT and rules: --sandbox-uplink-netns)
#                                                    │ veth
#                                                  INET (203.0.113.1/24 on wanp,
#                                                        198.51.100.1/32 on lo)
#
# In INET (all on 203.0.113.1 and 198.51.100.1):
#   :8080  busybox httpd over WWW: /hello.txt ("hello from the fake internet"),
#          /blob (BLOB_MIB MiB of zeros, default 8), /cgi-bin/whoami (the
#          peer address it saw: the uplink's, 203.0.113.2, proves the NAT)
#   :9000  a TCP sink (busybox nc, one connection at a time, closes after
#          the sender's EOF): guest -> internet throughput
#   :53    dnsmasq (on 203.0.113.1 only): files.example.test -> 203.0.113.1;
#          (no AAAA: an empty answer); every other name is refused (no
#          upstream)
#
# Usage: fake-internet.sh up UPLINK_NS INET_NS WWW_DIR
#        fake-internet.sh down UPLINK_NS INET_NS
# Needs root, iproute2 (`ip netns`), util-linux `nsenter`, busybox and
# dnsmasq. Runs under busybox sh (inside the nested L1) and under bash.
# Used by tests/nested/run-l1.sh (STASIS_L1_FAKE_INTERNET=1) and by
# tests/linux_sdk.rs on its direct route.
set -eu

say() { echo "fake-internet: $*"; }
# The tools, by path where given: a busybox sh that prefers its applets
# would otherwise run its own `ip` and `nsenter` whatever PATH says.
IP="${FI_IP:-ip}"
NSENTER="${FI_NSENTER:-nsenter}"
DNSMASQ="${FI_DNSMASQ:-dnsmasq}"

[ "$#" -ge 3 ] || { echo "usage: $0 up|down UPLINK_NS INET_NS [WWW_DIR]" >&2; exit 2; }
action="$1" up="$2" inet="$3"
in_inet() { "$NSENTER" --net="/run/netns/$inet" "$@"; }

case "$action" in
down)
    for ns in "$inet" "$up"; do
        [ -e "/run/netns/$ns" ] || continue
        for pid in $("$IP" netns pids "$ns" 2>/dev/null); do
            kill "$pid" 2>/dev/null || true
        done
        "$IP" netns del "$ns" || true
    done
    exit 0
    ;;
up) ;;
*) echo "$0: unknown action $action (up, down)" >&2; exit 2 ;;
esac

[ "$#" -eq 4 ] || { echo "usage: $0 up UPLINK_NS INET_NS WWW_DIR" >&2; exit 2; }
www="$4"
blob_mib="${BLOB_MIB:-8}"

for ns in "$up" "$inet"; do
    "$IP" netns add "$ns"
    "$IP" -n "$ns" link set lo up
done
"$IP" -n "$up" link add wan0 type veth peer name wanp
"$IP" -n "$up" link set wanp netns "$inet"
"$IP" -n "$up" addr add 203.0.113.2/24 dev wan0
"$IP" -n "$up" link set wan0 up
"$IP" -n "$up" route add default via 203.0.113.1
"$IP" -n "$inet" addr add 203.0.113.1/24 dev wanp
"$IP" -n "$inet" addr add 198.51.100.1/32 dev lo
"$IP" -n "$inet" link set wanp up

mkdir -p "$www/cgi-bin"
echo "hello from the fake internet" >"$www/hello.txt"
dd if=/dev/zero of="$www/blob" bs=1048576 count="$blob_mib" 2>/dev/null
cat >"$www/cgi-bin/whoami" <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\nyou are %s\n' "$REMOTE_ADDR"
EOF
chmod 0755 "$www/cgi-bin/whoami"

# busybox httpd daemonizes itself (no -f).
in_inet busybox httpd -p 8080 -h "$www"
in_inet "$DNSMASQ" --conf-file=/dev/null --no-resolv --no-hosts --no-poll \
    --user=root --group=root --pid-file="$www.dnsmasq.pid" \
    --listen-address=203.0.113.1 --bind-interfaces \
    --local=/example.test/ --address=/files.example.test/203.0.113.1
in_inet sh -c 'while :; do busybox nc -l -p 9000 </dev/null >/dev/null || sleep 1; done' \
    </dev/null >/dev/null 2>&1 &

# Ready when the uplink reaches the web server and the sink listens.
n=0
until "$NSENTER" --net="/run/netns/$up" busybox wget -q -O /dev/null \
    http://203.0.113.1:8080/hello.txt 2>/dev/null; do
    n=$((n + 1))
    [ "$n" -lt 50 ] || { say "FAIL: the web server in $inet does not answer"; exit 1; }
    sleep 0.2
done
say "up: uplink $up (203.0.113.2), internet $inet (203.0.113.1, 198.51.100.1): httpd :8080, sink :9000, dnsmasq :53 (files.example.test)"
