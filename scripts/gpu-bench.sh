#!/usr/bin/env bash
# Builds the release cost benchmark here and stages it in .gpu/ for a GPU machine, which has
# libtorch (PyTorch 2.11.0+cu130) but no Rust toolchain. Then, on that machine, from the
# repository root:
#
#     scripts/gpu-bench.sh run
#
# runs it on CUDA with that machine's libtorch (LD_LIBRARY_PATH overrides the binary's rpath),
# including the CPU/CUDA parity check (section 6), and the demo on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-build}" = build ]; then
  source scripts/env.sh
  cargo bench --bench guard_cost --no-run 2>/dev/null
  bin=$(cargo bench --bench guard_cost --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable") and "guard_cost" in m["executable"]]' | tail -n 1)
  cargo build --release --bin gradguard
  mkdir -p .gpu
  cp "$bin" .gpu/guard_cost
  cp target/release/gradguard .gpu/gradguard
  echo "staged: .gpu/guard_cost .gpu/gradguard (carry .gpu)"
else
  torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  .gpu/guard_cost --device cuda --steps 400 --repeats 3
  echo
  .gpu/gradguard demo --device cuda --steps 600 --out "${OUT:-/tmp}/demo-cuda" --metrics-addr 127.0.0.1:19464 | tail -n 8
fi
