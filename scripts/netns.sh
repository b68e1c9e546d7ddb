#!/usr/bin/env bash
# Network-namespace "hosts" on one machine, for multi-host tests and benchmarks.
#
#   scripts/netns.sh up N            N hosts h0..h(N-1), addresses 10.77.0.1..N/24, one bridge
#   scripts/netns.sh down            delete everything this prefix created
#   scripts/netns.sh cap HOST RATE   cap HOST's link both ways (tc tbf), e.g. cap 2 25mbit
#   scripts/netns.sh uncap HOST      remove the cap
#   scripts/netns.sh cut HOST        cut HOST's link (its switch port goes down: a black hole)
#   scripts/netns.sh restore HOST    plug it back in
#   scripts/netns.sh exec HOST CMD   run CMD inside HOST's namespace
#   scripts/netns.sh ns HOST         print HOST's namespace name
#   scripts/netns.sh addr HOST       print HOST's address
#
# Every host's TCP congestion control is $DECENTLAM_NETNS_CC (default cubic, Linux's default), not
# whatever this machine runs (a new namespace inherits the machine's default: BBR on some VMs,
# and BBR v1 flows sharing a capped link with a drop-tail queue lose ~20% of it; README).
#
# Everything lives in namespaces named after $DECENTLAM_NETNS (default "dlnet"): the hosts
# "<prefix>-h<i>" and a switch "<prefix>-sw" that holds the bridge, so nothing is added to the
# machine's own network namespace and runs with different prefixes never collide (the same
# 10.77.0.0/24 addresses exist separately in each run's namespaces). Each host also gets
# /etc/netns/<ns>/hosts naming every host "h<i>" (ip netns exec mounts it over /etc/hosts).
# Needs root, iproute2 (ip, tc); netem is not used.
set -euo pipefail

PREFIX=${DECENTLAM_NETNS:-dlnet}
SUBNET=${DECENTLAM_NETNS_SUBNET:-10.77.0}
SWITCH="$PREFIX-sw"
CC=${DECENTLAM_NETNS_CC:-cubic}

die() { echo "netns.sh: $*" >&2; exit 2; }
host_ns() { echo "$PREFIX-h$1"; }
host_addr() { echo "$SUBNET.$(($1 + 1))"; }
port_dev() { echo "${PREFIX}p$1"; }  # switch side of host i's cable
check_host() {
    [[ "$1" =~ ^[0-9]+$ ]] || die "host must be a number, got '$1'"
    ip netns list | grep -qw "$(host_ns "$1")" || die "no host $1 (namespace $(host_ns "$1"))"
}
[[ ${#PREFIX} -le 10 && "$PREFIX" =~ ^[a-z0-9]+$ ]] \
    || die "DECENTLAM_NETNS must be 1-10 lowercase letters/digits (interface names), got '$PREFIX'"

# A namespace may only choose a congestion control the machine marks as allowed; writing the
# machine's allowed list (with the algorithm added) marks it. That list is the one global change:
# the machine's own default algorithm stays as it is.
set_cc() {
    local ns=$1 allowed
    ip netns exec "$ns" sysctl -qw "net.ipv4.tcp_congestion_control=$CC" 2>/dev/null && return
    grep -qw "$CC" /proc/sys/net/ipv4/tcp_available_congestion_control \
        || die "TCP congestion control '$CC' is not available here (modprobe tcp_$CC?)"
    allowed=$(sysctl -n net.ipv4.tcp_allowed_congestion_control)
    [[ " $allowed " == *" $CC "* ]] || allowed="$allowed $CC"
    sysctl -qw net.ipv4.tcp_allowed_congestion_control="$allowed"
    ip netns exec "$ns" sysctl -qw "net.ipv4.tcp_congestion_control=$CC" \
        || die "cannot set TCP congestion control '$CC' in $ns"
}

up() {
    local n=$1 i ns
    [[ "$n" =~ ^[0-9]+$ && $n -ge 1 && $n -le 200 ]] || die "up: N must be 1..200, got '$n'"
    ip netns list | grep -qw "$SWITCH" && die "namespaces with prefix '$PREFIX' exist: run down first"
    ip netns add "$SWITCH"
    ip -n "$SWITCH" link set lo up
    ip -n "$SWITCH" link add br0 type bridge
    ip -n "$SWITCH" link set br0 up
    for ((i = 0; i < n; i++)); do
        ns=$(host_ns "$i")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # Create the pair inside the switch (names are per namespace), then move one end.
        ip -n "$SWITCH" link add "$(port_dev "$i")" type veth peer name eth0 netns "$ns"
        ip -n "$SWITCH" link set "$(port_dev "$i")" master br0 up
        ip -n "$ns" addr add "$(host_addr "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        set_cc "$ns"
        mkdir -p "/etc/netns/$ns"
        {
            echo "127.0.0.1 localhost"
            for ((j = 0; j < n; j++)); do echo "$(host_addr "$j") h$j"; done
        } >"/etc/netns/$ns/hosts"
    done
}

down() {
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$PREFIX-(sw|h[0-9]+)$" || true); do
        # Processes still inside keep a namespace alive after its name is gone: end them.
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
}

# tbf on both ends of the cable: the host's egress (upload) and the switch port's egress
# (download). The burst is ~10 ms of traffic (at least 16 KiB), the queue holds 100 ms.
cap() {
    local i=$1 rate=$2 bits burst
    check_host "$i"
    bits=$(tc_rate_bits "$rate")
    burst=$((bits / 8 / 100)); ((burst < 16384)) && burst=16384
    tc -n "$(host_ns "$i")" qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency 100ms
    tc -n "$SWITCH" qdisc replace dev "$(port_dev "$i")" root tbf rate "$rate" burst "$burst" latency 100ms
}

uncap() {
    check_host "$1"
    tc -n "$(host_ns "$1")" qdisc del dev eth0 root 2>/dev/null || true
    tc -n "$SWITCH" qdisc del dev "$(port_dev "$1")" root 2>/dev/null || true
}

tc_rate_bits() {
    local value unit
    [[ "$1" =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] || die "rate must look like 25mbit, got '$1'"
    value=${BASH_REMATCH[1]}; unit=${BASH_REMATCH[2]}
    case $unit in
        bit) echo "$value" ;; kbit) echo $((value * 1000)) ;;
        mbit) echo $((value * 1000000)) ;; gbit) echo $((value * 1000000000)) ;;
    esac
}

cmd=${1:-}
shift || true
case $cmd in
    up) [[ $# -eq 1 ]] || die "usage: up N"; up "$1" ;;
    down) down ;;
    cap) [[ $# -eq 2 ]] || die "usage: cap HOST RATE"; cap "$1" "$2" ;;
    uncap) [[ $# -eq 1 ]] || die "usage: uncap HOST"; uncap "$1" ;;
    cut) [[ $# -eq 1 ]] || die "usage: cut HOST"; check_host "$1"
        ip -n "$SWITCH" link set "$(port_dev "$1")" down ;;
    restore) [[ $# -eq 1 ]] || die "usage: restore HOST"; check_host "$1"
        ip -n "$SWITCH" link set "$(port_dev "$1")" up ;;
    exec) [[ $# -ge 2 ]] || die "usage: exec HOST CMD..."; check_host "$1"
        ns=$(host_ns "$1"); shift; exec ip netns exec "$ns" "$@" ;;
    ns) [[ $# -eq 1 ]] || die "usage: ns HOST"; host_ns "$1" ;;
    addr) [[ $# -eq 1 ]] || die "usage: addr HOST"; host_addr "$1" ;;
    *) sed -n '2,18p' "$0" >&2; exit 2 ;;
esac
