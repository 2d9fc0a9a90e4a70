# Developer entry points. Every target needs only Go (and, for `proto`, the
# tools pinned under tools/, which `go tool` builds on first use).

GO       ?= go
BUF      := $(GO) tool -modfile=tools/buf/go.mod buf
ACTIONLINT := $(GO) tool -modfile=tools/actionlint/go.mod actionlint
SBOM     := $(GO) tool -modfile=tools/sbom/go.mod cyclonedx-gomod
BIN      := bin
PKGS     := ./...
# deploy/ is a module of its own, so the heavy Kubernetes and Prometheus
# libraries its tests use stay out of the relay's dependency graph.
SUBMODS  := deploy
# The race detector needs cgo, and cgo a C compiler: on a machine with only
# Go, `go env CGO_ENABLED` says 0 and `make test` runs without it, saying
# so. CI (.ci/run) installs gcc and sets RELAY_REQUIRE_RACE=1, which makes
# a missing race detector an error.
RACE     := $(shell [ "$$($(GO) env CGO_ENABLED 2>/dev/null)" = 1 ] && echo -race)
# Packages whose coverage the project holds at 80% or more: the session
# core (handshake, validation, relay), the auth code, the state machine.
CORE_PKGS := edge/session edge/proof edge/devconn control/auth control/fsm control/api

# The inputs and outputs of `make proto`: their digest, recorded in
# proto/generated.sum by `make proto`, lets verify-proto skip building buf
# when none of them changed since.
PROTO_FILES = $$(find proto -name '*.proto' -o -name '*.go' | LC_ALL=C sort) buf.yaml buf.gen.yaml \
	tools/buf/go.mod tools/buf/go.sum tools/protogen/go.mod tools/protogen/go.sum
PROTO_SUM   = sha256sum $(PROTO_FILES) | sha256sum | cut -c1-64

.PHONY: all run build test test-tools test-short vet lint fmt proto verify-proto verify-proto-full web k6 bench bench-compare cover fuzz chaos clean image image-bin release-local

all: build

## run: start a single-machine deployment with embedded defaults (relayd dev).
run: build
	$(BIN)/relayd dev

## build: compile the binaries into bin/ (static, without cgo: Pebble then
## uses its pure-Go zstd, and the first build skips compiling C).
build:
	@mkdir -p $(BIN)
	@[ -f $(BIN)/relayd ] || echo "building bin/relayd and bin/relayctl; the first build compiles every dependency (4 to 5 minutes on 2 cores: see README)..."
	CGO_ENABLED=0 $(GO) build -ldflags='$(VERSION_LDFLAGS)' -o $(BIN)/ ./cmd/...

## test: everything CI checks: generated code fresh, vet, formatting, tests with -race
## (without it, saying so, where no C compiler lets cgo build it).
test: verify-proto vet lint-fmt test-tools
	@if [ -n "$(RACE)" ]; then echo "running the tests with the race detector (the first run compiles everything with it: minutes)..."; \
	elif [ "$$RELAY_REQUIRE_RACE" = 1 ]; then echo "RELAY_REQUIRE_RACE is set but cgo is off (no C compiler: install gcc): the race detector cannot run" >&2; exit 1; \
	else echo "NOTE: cgo is off here (no C compiler), so the tests run WITHOUT the race detector; install gcc (Debian: apt-get install gcc) to run them as CI does"; fi
	$(GO) test $(RACE) -count=1 -timeout 20m $(PKGS)
	@for m in $(SUBMODS); do (cd $$m && $(GO) test $(RACE) -count=1 -timeout 10m ./...) || exit 1; done

## test-tools: say which tests will skip because this machine lacks what
## they run (CI installs all of it and turns those skips into failures).
test-tools:
	@missing=""; \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || missing="$$missing chromium(browser tests)"; \
	for t in promtool:prometheus prometheus:prometheus prometheus-alertmanager:prometheus-alertmanager amtool:prometheus-alertmanager \
		podman:podman systemd-analyze:systemd openssl:openssl; do \
		command -v $${t%%:*} >/dev/null || missing="$$missing $${t%%:*}(deploy tests; Debian package $${t#*:})"; \
	done; \
	{ [ "$$(id -u)" = 0 ] && command -v iptables >/dev/null && command -v ip >/dev/null; } || missing="$$missing root+iptables+ip(partition tests)"; \
	if [ -n "$$missing" ]; then echo "these tests will SKIP, saying why (go test -v shows it): missing$$missing; .ci/run installs them"; fi

## test-short: the tests without the race detector, for a quick loop.
test-short:
	$(GO) test -count=1 $(PKGS)
	@for m in $(SUBMODS); do (cd $$m && $(GO) test -count=1 ./...) || exit 1; done

vet:
	$(GO) vet $(PKGS)
	@for m in $(SUBMODS); do (cd $$m && $(GO) vet ./...) || exit 1; done

## lint: vet, gofmt check, buf lint, actionlint on .github/workflows.
lint: vet lint-fmt
	$(BUF) lint
	$(ACTIONLINT)

lint-fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed (run make fmt):"; echo "$$out"; exit 1; fi

## fmt: rewrite Go files with gofmt.
fmt:
	gofmt -w $$(git ls-files '*.go')

## proto: regenerate the committed Go code from proto/ (and its digest, and
## docs/openapi.json, which the compiled descriptors make).
proto:
	@echo "buf and the protoc plugins are built on first use (minutes on 2 cores)..."
	$(BUF) lint
	$(BUF) generate
	@$(PROTO_SUM) > proto/generated.sum
	$(GO) test ./control/openapi -run TestCommittedDocumentIsCurrent -update >/dev/null

## web: rebuild the browser client and console page (edge/web/dist, committed
## and embedded in relayd) after changing edge/web or proto/relay; needs npm,
## with the tools pinned in edge/web/package-lock.json.
web:
	cd edge/web && npm ci --no-audit --no-fund
	$(BUF) generate --template edge/web/buf.gen.yaml
	cd edge/web && npx tsc --noEmit -p . && node build.mjs

## k6: rebuild the k6 suite's bundles (loadtest/k6/dist, committed) after
## changing loadtest/k6/src or proto/relay; needs npm, with the tools
## pinned in loadtest/k6/package-lock.json.
k6:
	cd loadtest/k6 && npm ci --no-audit --no-fund
	$(BUF) generate --template loadtest/k6/buf.gen.yaml
	cd loadtest/k6 && npx tsc --noEmit -p . && node build.mjs

## verify-proto: fail when the committed generated code differs from what proto/ generates.
## Outside CI, when nothing under proto/ (nor the pinned tools) changed since
## `make proto` recorded proto/generated.sum, the check stops there instead of
## building buf; CI (CI=true) and verify-proto-full always run buf.
verify-proto:
	@if [ -z "$$CI" ] && [ "$$($(PROTO_SUM))" = "$$(cat proto/generated.sum 2>/dev/null)" ]; then \
		echo "generated code is what make proto made from proto/ (proto/generated.sum; make verify-proto-full checks with buf)"; \
	else $(MAKE) --no-print-directory verify-proto-full; fi

## verify-proto-full: the check with buf, whatever proto/generated.sum says.
verify-proto-full:
	@echo "checking the generated code with buf (built on first use: minutes on 2 cores)..."
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	$(BUF) lint && $(BUF) generate -o $$tmp && \
	for f in $$(cd $$tmp && find proto -name '*.go'); do \
		cmp -s $$tmp/$$f $$f || { echo "stale generated file: $$f (run make proto)"; exit 1; }; \
	done; \
	for f in $$(find proto -name '*.go'); do \
		[ -f $$tmp/$$f ] || { echo "generated file without a source: $$f (run make proto)"; exit 1; }; \
	done; echo "generated code is up to date"; \
	[ "$$($(PROTO_SUM))" = "$$(cat proto/generated.sum 2>/dev/null)" ] || \
		echo "note: proto/generated.sum is out of date, so verify-proto builds buf every time: run make proto"

## bench: run the benchmarks (figures go to docs/benchmarks.md by hand, with this command).
bench:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

## bench-compare: the relay against quic-go's own floor, servers and clients
## pinned to separate cores, in separate processes (docs/benchmarks.md).
BENCH_OUT ?= bin/bench-compare
bench-compare:
	loadtest/compare.sh $(BENCH_OUT)

## cover: print test coverage per package; fail when a core package is below 80%.
cover:
	@mkdir -p $(BIN); fail=0; \
	$(GO) test -count=1 -cover $(PKGS) > $(BIN)/.cover.txt 2>&1 || fail=1; \
	sed -e 's/^ok *//' $(BIN)/.cover.txt; \
	for p in $(CORE_PKGS); do \
		pct=$$(grep "relay/$$p\s" $(BIN)/.cover.txt | sed -n 's/.*coverage: \([0-9.]*\)%.*/\1/p'); \
		if [ -z "$$pct" ] || awk "BEGIN{exit !($$pct < 80)}"; then echo "coverage of $$p is $${pct:-unknown}%, below 80%"; fail=1; fi; \
	done; exit $$fail

## fuzz: run each fuzz target for FUZZTIME (default 30s).
FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list $(PKGS)); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

## chaos: the seeded nemesis tests of internal/partitiontest (real relayd
## processes in network namespaces; needs root, ip and iptables) for
## DURATION each, with SEED (default: drawn and printed). The log goes to
## CHAOS_OUT/chaos.log; on a failure the seed is printed and the history
## (JSON, and porcupine's HTML view) is kept under CHAOS_OUT.
## Example: make chaos DURATION=30m SEED=1234 [RUN=TestControlPlaneNemesis]
DURATION  ?= 30m
SEED      ?=
RUN       ?= Nemesis
CHAOS_OUT ?= $(BIN)/chaos
chaos:
	@mkdir -p $(CHAOS_OUT)
	@{ RELAY_CHAOS_DURATION=$(DURATION) RELAY_CHAOS_SEED=$(SEED) RELAY_CHAOS_OUT=$(abspath $(CHAOS_OUT)) RELAY_REQUIRE_NETNS=1 \
		$(GO) test -count=1 -timeout 0 -v -run '$(RUN)' ./internal/partitiontest; echo $$? > $(CHAOS_OUT)/.rc; } 2>&1 | tee $(CHAOS_OUT)/chaos.log
	@exit $$(cat $(CHAOS_OUT)/.rc)

clean:
	rm -rf $(BIN)

# The container image (Containerfile): static binaries built here, copied
# onto IMAGE_BASE. IMAGE_BASE=scratch builds without pulling anything (the
# deploy tests do that); the release workflow compiles inside the builder
# stage instead and pushes for linux/amd64 and linux/arm64.
IMAGE      ?= localhost/relay:dev
IMAGE_BASE ?= gcr.io/distroless/static-debian12:nonroot
IMAGE_ARCH ?= $(shell $(GO) env GOARCH)
VERSION    ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION   ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
# The release relayd and relayctl say they are (relayd version,
# relay_build_info): internal/buildinfo.
VERSION_LDFLAGS = -X github.com/edge-relay/relay/internal/buildinfo.version=$(VERSION) \
	-X github.com/edge-relay/relay/internal/buildinfo.revision=$(REVISION)
GO_LDFLAGS = -s -w $(VERSION_LDFLAGS)

## image-bin: static linux binaries for the image into bin/image/linux/$(IMAGE_ARCH).
image-bin:
	CGO_ENABLED=0 GOOS=linux GOARCH=$(IMAGE_ARCH) $(GO) build -trimpath -buildvcs=false -ldflags='$(GO_LDFLAGS)' \
		-o $(BIN)/image/linux/$(IMAGE_ARCH)/ ./cmd/relayd ./cmd/relayctl
	mkdir -p $(BIN)/image/linux/$(IMAGE_ARCH)/state

## image: build the container image $(IMAGE) with podman from image-bin's binaries.
image: image-bin
	podman build --platform linux/$(IMAGE_ARCH) --build-arg BASE=$(IMAGE_BASE) --build-arg BINARIES=prebuilt \
		--build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) -f Containerfile -t $(IMAGE) .

## release-local: what the release workflow publishes, built here into
## $(BIN)/release: binaries for linux/amd64 and linux/arm64 (tar.gz), an
## SBOM (CycloneDX JSON) per binary and platform, and SHA256SUMS.
RELEASE_DIR := $(BIN)/release
release-local:
	rm -rf $(RELEASE_DIR) && mkdir -p $(RELEASE_DIR)
	@set -e; for arch in amd64 arm64; do \
		d=$(BIN)/release-stage/relay-$(VERSION)-linux-$$arch; rm -rf $$d; mkdir -p $$d; \
		CGO_ENABLED=0 GOOS=linux GOARCH=$$arch $(GO) build -trimpath -buildvcs=false -ldflags='$(GO_LDFLAGS)' -o $$d/ ./cmd/relayd ./cmd/relayctl; \
		cp README.md $$d/; mkdir -p $$d/deploy && cp -r deploy/systemd deploy/scripts $$d/deploy/; \
		tar -C $(BIN)/release-stage --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -czf $(RELEASE_DIR)/relay-$(VERSION)-linux-$$arch.tar.gz relay-$(VERSION)-linux-$$arch; \
		for cmd in relayd relayctl; do \
			$(SBOM) bin -json -version $(VERSION) \
				-output $(RELEASE_DIR)/relay-$(VERSION)-linux-$$arch.$$cmd.cdx.json $$d/$$cmd; \
		done; \
		echo "built $(RELEASE_DIR)/relay-$(VERSION)-linux-$$arch.tar.gz and its SBOMs"; \
	done
	cd $(RELEASE_DIR) && sha256sum relay-* > SHA256SUMS && cat SHA256SUMS
