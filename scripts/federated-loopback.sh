#!/usr/bin/env bash
# The loopback deployment of docs/FEDERATED.md ("A local deployment on loopback"), as a script:
# a SuperLink and three SuperNodes on this machine, one run of gradguard's Flower App, from any
# folder (the run's files go to ./out). It waits for the SuperLink before `flwr run`, streams
# the run, prints the round table, and stops every process it started, by id, however it ends.
#
#   export GRADGUARD=/path/to/gradguard
#   "$GRADGUARD/scripts/federated-loopback.sh" [BASE_PORT]      # default 9100
#
# Ports: BASE (SuperLink), BASE+10..12 (SuperNodes), BASE+20..22 (node metrics), BASE+30 (server
# metrics). Exits non-zero when the run failed (its events.jsonl records run-failed) or produced
# no round table. federated/tests/test_loopback_script.py runs it and checks the documented table.
set -euo pipefail
GRADGUARD=${GRADGUARD:-$(cd "$(dirname "$0")/.." && pwd)}
base=${1:-9100}
mkdir -p out
pids=()
stop() {
  # Nodes first, then the SuperLink: each stops its own children (ClientApps, SuperExec).
  for ((k = ${#pids[@]} - 1; k >= 0; k--)); do kill "${pids[$k]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  printf '%s\n' "${pids[@]}" > out/loopback-pids.txt
}
trap stop EXIT

# shellcheck source=env.sh
source "$GRADGUARD/scripts/env.sh"
export FLWR_HOME=$PWD/out/flwr-home FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p "$FLWR_HOME" && printf '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$base" > "$FLWR_HOME/config.toml"

flower-superlink --insecure --host 127.0.0.1 --port "$base" --disable-runtime-dependency-installation > out/superlink.log 2>&1 &
pids+=($!)
"$GRADGUARD/scripts/wait-for-port.sh" 127.0.0.1 "$base"
policies=(default.toml tight-first-layer.toml impossible.toml)
for i in 0 1 2; do
  flower-supernode --insecure --superlink "127.0.0.1:$base" --port $((base + 10 + i)) \
    --node-config "partition-id=$i num-partitions=3 policy='${policies[$i]}' metrics-port=$((base + 20 + i))" > "out/node$i.log" 2>&1 &
  pids+=($!)
done

rm -rf out/fl-run
flwr run "$GRADGUARD/federated" loopback --stream --run-config "out-dir='$PWD/out/fl-run' metrics-port=$((base + 30)) min-nodes=3 \
  required-policy='default.toml tight-first-layer.toml impossible.toml'"

if grep -q '"event": "run-failed"' out/fl-run/events.jsonl 2>/dev/null; then
  echo "federated-loopback: the run failed: $(grep '"event": "run-failed"' out/fl-run/events.jsonl)" >&2
  exit 1
fi
if [ ! -s out/fl-run/rounds.txt ]; then
  echo "federated-loopback: the run wrote no round table (out/fl-run/rounds.txt); see out/*.log" >&2
  exit 1
fi
cat out/fl-run/rounds.txt
