#!/usr/bin/env bash
# Installs what tests/prometheus_integration.rs needs: `prometheus` and `promtool` on PATH.
# Idempotent: does nothing when both are already there. Uses Debian's `prometheus` package
# (which ships promtool too); needs root (or sudo) for apt-get.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have prometheus && have promtool; then
    echo "prometheus and promtool already installed:"
    prometheus --version 2>&1 | head -n 1
    exit 0
fi

if ! have apt-get; then
    echo "error: prometheus/promtool missing and apt-get unavailable; install Prometheus >= 2.37 by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then SUDO="sudo"; else
        echo "error: root or sudo needed to apt-get install prometheus" >&2
        exit 1
    fi
fi

# Look before installing: is there a candidate at all (maybe only after an update)?
# (Read the policy into a variable: `grep -q` on a pipe trips pipefail via SIGPIPE.)
candidate() { apt-cache policy prometheus 2>/dev/null | sed -n 's/^ *Candidate: *//p'; }
$SUDO apt-get update
cand="$(candidate)"
echo "apt-cache policy prometheus: candidate ${cand:-<none>}"
if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
    echo "error: no installable 'prometheus' package in the configured apt sources" >&2
    exit 1
fi
# The Debian package starts a service on systems with an init; tests start their own servers.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends prometheus

for tool in prometheus promtool; do
    if ! have "$tool"; then
        echo "error: $tool still not on PATH after installing the package" >&2
        exit 1
    fi
done
prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
