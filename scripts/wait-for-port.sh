#!/usr/bin/env bash
# Waits until something listens on HOST:PORT (a TCP connection succeeds), polling every 0.2 s:
#
#     scripts/wait-for-port.sh HOST PORT [TIMEOUT_SECONDS]      (default 60)
#
# Exits 0 as soon as a connection succeeds; 1 with a message on stderr when TIMEOUT_SECONDS pass
# first; 2 on bad arguments. docs/FEDERATED.md runs it between starting `flower-superlink` and
# `flwr run`, which fails ("Connection to the SuperLink is unavailable") until the SuperLink
# listens, about 2 s after it starts. Uses bash's /dev/tcp (no other tool needed).
set -u

usage() {
    echo "usage: $(basename "$0") HOST PORT [TIMEOUT_SECONDS]" >&2
    exit 2
}

[ $# -ge 2 ] && [ $# -le 3 ] || usage
host=$1
port=$2
timeout=${3:-60}
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || { echo "$(basename "$0"): PORT must be 1..65535, got '$port'" >&2; exit 2; }
[[ $timeout =~ ^[0-9]+$ ]] || { echo "$(basename "$0"): TIMEOUT_SECONDS must be a whole number of seconds, got '$timeout'" >&2; exit 2; }

# One attempt, bounded: a host that drops packets would otherwise hold connect() for minutes.
attempt() {
    if command -v timeout >/dev/null 2>&1; then
        timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
    else
        bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
    fi
}

start=$SECONDS
until attempt; do
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
        echo "$(basename "$0"): nothing listens on $host:$port after ${timeout} s" >&2
        exit 1
    fi
    sleep 0.2
done
