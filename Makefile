# cxone-offboard: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Local services (scripts/services.sh) and the credentials the local S3 server accepts.
export OFFBOARD__S3__ENDPOINT ?= http://127.0.0.1:9000
export AWS_ACCESS_KEY_ID ?= test
export AWS_SECRET_ACCESS_KEY ?= test
export AWS_REGION ?= us-east-1
# Never ask the EC2 metadata service for credentials on a developer machine or in CI.
export AWS_EC2_METADATA_DISABLED ?= true
CARGO ?= cargo

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

.PHONY: services
services: ## Install if needed and start RabbitMQ, Redis, moto and s3s-fs; create the buckets
	@scripts/services.sh up

.PHONY: services-down
services-down: ## Stop the services this repository started
	@scripts/services.sh down

.PHONY: demo
demo: ## Simulator + worker + local services: offboard 50 simulated users and print a summary
	@scripts/services.sh up rabbitmq moto
	$(CARGO) run --quiet -- demo --users $(or $(USERS),50)$(if $(filter 1 true yes,$(DEMO_INTAKE)), --intake)

.PHONY: run
run: services ## Run the worker against the local services (set OFFBOARD__CXONE__* for a tenant)
	$(CARGO) run --quiet -- worker

.PHONY: sim
sim: ## Run the CXone simulator on 127.0.0.1:8088
	$(CARGO) run --quiet -- sim --listen 127.0.0.1:8088

.PHONY: build
build: ## Build the release binary
	$(CARGO) build --release --locked

.PHONY: test
test: services ## Start the services, then run every test (unit + integration, real broker and S3)
	$(CARGO) test --locked --lib --bins --tests

.PHONY: reliability
reliability: services ## Full reliability suite: chaos (500 events), fault matrix, hostile input, security, proptest
	@scripts/reliability.sh full

.PHONY: reliability-ci
reliability-ci: services ## The reduced reliability suite CI runs (120 events, under 10 minutes)
	@scripts/reliability.sh ci

.PHONY: fuzz
fuzz: ## cargo-fuzz the event decoder and the CSV importer, FUZZ_SECS each (installs cargo-fuzz)
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run event_parse -- -max_total_time=$(or $(FUZZ_SECS),60)
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run csv_import -- -max_total_time=$(or $(FUZZ_SECS),60)

.PHONY: lint
lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: bench
bench: ## End-to-end benchmarks (issue 10), 3 runs each: writes BENCHMARKS.md and docs/bench/*.svg (~40 min)
	@scripts/bench.sh

.PHONY: bench-quick
bench-quick: ## Scaled-down benchmarks, 1 run each (~3 min after a release build): target/bench-quick/
	@scripts/bench.sh --quick

.PHONY: prometheus-check
prometheus-check: ## A real Prometheus on a demo run: every dashboard query and alert finds its series
	@scripts/prometheus-check.sh

.PHONY: check
check: services ## Run `cxone-offboard check` against the local services
	$(CARGO) run --quiet -- check

# Container image: tag = the crate version (Cargo.toml). DOCKER=podman works too.
DOCKER ?= docker
IMAGE ?= cxone-offboard
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

.PHONY: helm-lint
helm-lint: ## Lint, render and validate the Helm chart; promtool on its alert rules; its tests (installs tools)
	@scripts/helm-lint.sh

.PHONY: image
image: ## Build the container image cxone-offboard:VERSION (needs a Docker engine with BuildKit)
	$(DOCKER) build -t $(IMAGE):$(VERSION) \
		--build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
		--build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) .
