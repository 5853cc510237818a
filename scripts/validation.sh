#!/usr/bin/env bash
# Regenerates the validation study: docs/VALIDATION.md and docs/validation/*.svg.
# Extra flags go to `gradguard validate` (e.g. --seed 1, or --quick for a smoke run that
# should then be written elsewhere: --out /tmp/validation).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || scripts/setup-venv.sh
source scripts/env.sh
cargo run --release --bin gradguard -- validate --out docs "$@"
