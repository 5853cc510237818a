#!/usr/bin/env bash
# The Flower side of gradguard (docs/FEDERATED.md): installs flwr with its Simulation Engine
# (flwr[simulation]: Ray, pinned by flwr to ray 2.55.1), maturin, prometheus-client
# and pytest into the project venv (.venv, with libtorch 2.11.0 from scripts/setup-venv.sh),
# then builds the Python package `gradguard` (python/: PyTorch loops with gradguard.wrap, the
# Flower client's gradguard.fl, alias gradguard_fl; its native module gradguard._native, PyO3)
# with maturin against that same libtorch and installs it into the venv. Idempotent: the pip step runs once per set of
# pinned versions; the build is cargo's incremental release build (seconds when nothing
# changed) and reinstalls the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
# shellcheck source=env.sh
source scripts/env.sh

FLWR_VERSION=1.42.0
MATURIN_VERSION=1.16.0
PROMETHEUS_CLIENT_VERSION=0.26.0
PYTEST_VERSION=9.2.0
stamp=".venv/.gradguard-federated-flwr-sim-$FLWR_VERSION-maturin-$MATURIN_VERSION-prom-$PROMETHEUS_CLIENT_VERSION-pytest-$PYTEST_VERSION"
if [ ! -f "$stamp" ]; then
  python -m pip install --quiet \
    "flwr[simulation]==$FLWR_VERSION" \
    "maturin==$MATURIN_VERSION" \
    "prometheus-client==$PROMETHEUS_CLIENT_VERSION" \
    "pytest==$PYTEST_VERSION"
  # flwr must not have moved torch: the extension links the venv's libtorch 2.11.0.
  python -c "import ray, torch, flwr; assert ray.__version__ == '2.55.1', ray.__version__; assert torch.__version__.startswith('2.11.0'), torch.__version__; assert flwr.__version__ == '$FLWR_VERSION', flwr.__version__"
  touch "$stamp"
fi

# LIBTORCH_USE_PYTORCH=1 (scripts/env.sh): torch-sys links the venv's torch/lib; the crate's
# build script (build-support/link_libtorch.rs) adds its rpath, so the module loads without
# LD_LIBRARY_PATH and without importing torch first.
# The package was called gradguard-fl (the module gradguard_fl alone) before it grew into
# gradguard: an old install would shadow the alias package.
if python -m pip show --quiet gradguard-fl 2>/dev/null; then
  python -m pip uninstall --quiet --yes gradguard-fl
fi
maturin develop --release --manifest-path python/Cargo.toml

# Both names load (gradguard imports torch first: its native module needs torch's Python
# bindings; the same libtorch either way).
python -c "import gradguard_fl; assert gradguard_fl.layer_names() == ['conv1', 'conv2', 'fc1', 'fc2']"
python -c "import gradguard, torch; m = torch.nn.Sequential(torch.nn.Linear(2, 1)); g = gradguard.wrap(m, torch.optim.SGD(m.parameters(), 0.1), lambda x, y: ((m(x) - y) ** 2).mean()); assert g.layer_names == ['0'], g.layer_names"
echo "gradguard $(python -c 'import gradguard; print(gradguard.__version__)') installed in $VIRTUAL_ENV (flwr $FLWR_VERSION)"
