#!/usr/bin/env bash
# Installs what the integration tests need from Debian: `prometheus` and `promtool` on PATH
# (tests/prometheus_integration.rs) and `chromium` (tests/browser_pages.rs, headless).
# Idempotent: does nothing when they are already there. Needs root (or sudo) for apt-get.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have prometheus && have promtool && have chromium; then
    echo "prometheus, promtool and chromium already installed:"
    prometheus --version 2>&1 | head -n 1
    chromium --version 2>&1 | head -n 1
    exit 0
fi

if ! have apt-get; then
    echo "error: prometheus/promtool or chromium missing and apt-get unavailable; install Prometheus >= 2.37 and Chromium by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then SUDO="sudo"; else
        echo "error: root or sudo needed to apt-get install prometheus chromium" >&2
        exit 1
    fi
fi

# Look before installing: is there a candidate at all (maybe only after an update)?
# (Read the policy into a variable: `grep -q` on a pipe trips pipefail via SIGPIPE.)
candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p'; }
$SUDO apt-get update
for pkg in prometheus chromium; do
    cand="$(candidate "$pkg")"
    echo "apt-cache policy $pkg: candidate ${cand:-<none>}"
    if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
        echo "error: no installable '$pkg' package in the configured apt sources" >&2
        exit 1
    fi
done
# The Debian package starts a service on systems with an init; tests start their own servers.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends prometheus chromium

for tool in prometheus promtool chromium; do
    if ! have "$tool"; then
        echo "error: $tool still not on PATH after installing the package" >&2
        exit 1
    fi
done
prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
chromium --version 2>&1 | head -n 1
