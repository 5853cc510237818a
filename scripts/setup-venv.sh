#!/usr/bin/env bash
# Creates the project-local venv with libtorch 2.11.0 (PyPI's torch wheel) when it is missing.
# Idempotent: returns at once when the venv already holds the pinned torch.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0
stamp=.venv/.gradguard-torch-$TORCH_VERSION
if [ -f "$stamp" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Never unpinned: tch 0.24 requires libtorch 2.11.0 exactly.
.venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION" numpy
.venv/bin/python -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
touch "$stamp"
