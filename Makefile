# The two commands of the README. Both set up the project-local venv (libtorch 2.11.0) when
# it is missing, build in release mode (one shared build for the demo and the tests) and run.
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: demo test venv test-deps build bench validation

venv:
	@scripts/setup-venv.sh

# Prometheus, promtool and chromium for the integration tests (Debian packages).
test-deps:
	@scripts/install-test-deps.sh

build: venv
	$(ENV) cargo build --release --bins --examples

demo: venv
	$(ENV) cargo run --release --bin gradguard -- demo $(ARGS)

# Every test of the workspace; benches are built (so they keep compiling) but not run here.
# One test at a time in each test binary: libtorch's default random generator is global to the
# process, the tests seed it, and the guard puts it back after its own passes (observe-only with
# dropout), which would undo another test thread's draws made meanwhile.
test: venv test-deps
	$(ENV) cargo test --release --workspace --exclude gradguard-py --lib --bins --tests --examples -- --test-threads=1
	$(ENV) cargo test --release --workspace --exclude gradguard-py --doc
	$(ENV) cargo bench --workspace --exclude gradguard-py --no-run
	scripts/user-crate.sh
	scripts/federated-setup.sh
	$(ENV) PYTHONDONTWRITEBYTECODE=1 python -m pytest -q -p no:cacheprovider python/tests
	$(ENV) PYTHONDONTWRITEBYTECODE=1 python -m pytest -q -p no:cacheprovider federated/tests

# The cost benchmarks (docs/PERFORMANCE.md).
bench: venv
	$(ENV) cargo bench --bench guard_cost
	$(ENV) cargo bench --bench scrape_load

# The validation study (docs/VALIDATION.md and docs/validation/*.svg), about 6 minutes.
validation: venv
	$(ENV) cargo run --release --bin gradguard -- validate --out docs
