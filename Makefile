# The two commands of the README. Both set up the project-local venv (libtorch 2.11.0) when
# it is missing, build in release mode (one shared build for the demo and the tests) and run.
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: demo test venv build

venv:
	@scripts/setup-venv.sh

build: venv
	$(ENV) cargo build --release --bins --examples

demo: venv
	$(ENV) cargo run --release --bin gradguard -- demo $(ARGS)

test: venv
	$(ENV) cargo test --release --workspace --all-targets
