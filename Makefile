# pop3-kafka developer entry points. `make demo` and `make test` work on a fresh Debian-like machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# libpython3.11-testsuite: CPython's test_email corpus, used by the decoding tests
# python3-venv: Debian's python3 has no ensurepip without it.
# mailutils-pop3d: GNU pop3d, the second POP3 peer (deploy/local/mailutils.py); its service is
# kept from starting by the policy-rc.d guard below. prometheus: the real server (and promtool) that
# scrapes the connector in tests/integration/test_metrics_e2e.py; its service is kept from starting too.
# bubblewrap: runs the connector with a read-only root (tests/integration/test_readonly_root.py).
APT_PACKAGES := dovecot-core dovecot-pop3d dovecot-lmtpd openssl maven openjdk-17-jdk-headless \
	libpython3.11-testsuite python3-venv mailutils-pop3d prometheus bubblewrap

.PHONY: deps venv lint typecheck test test-unit test-integration demo demo-down stack-up stack-down objectstore registry bench bench-deps bench-timeline bench-timeline-mb50 bench-parsers clean crash-matrix fuzz large-mail scale-out bench-large-mail bench-many-mailboxes bench-tls-context bench-scheduler-loop dist helm-tools rules image compose-up compose-down java-deps

# System packages (Dovecot, OpenSSL, Maven, a Java 17 JDK: tests/java/ is compiled); skipped when
# already present.
# Installing dovecot-core would start the system Dovecot on *:110/995: a temporary
# policy-rc.d forbids service starts during the install (our servers listen on loopback only).
deps:
	@need=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || need="$$need $$p"; done; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null; \
	    $$SUDO chmod 755 /usr/sbin/policy-rc.d; guard=1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$need; \
	  rc=$$?; if [ -n "$$guard" ]; then $$SUDO rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi

$(BIN)/pop3-kafka: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/pop3-kafka

lint: venv
	$(BIN)/ruff check connector tests bench deploy
	$(BIN)/ruff format --check connector tests bench deploy

typecheck: venv
	$(BIN)/mypy

# The whole suite: lint, types, unit and integration tests (starts Kafka and Dovecot itself
# unless KAFKA_BOOTSTRAP and DOVECOT_TEST_DIR point at running ones). bench-deps: the benchmark's
# smoke test (tests/integration/test_bench_smoke.py) runs getmail6 and fetchmail.
test: deps venv bench-deps lint typecheck objectstore registry
	$(BIN)/pytest

test-unit: venv
	$(BIN)/pytest tests/unit

test-integration: deps venv bench-deps objectstore registry
	$(BIN)/pytest tests/integration

# The Java consumer example (tests/java/, Apache Avro + kafka-clients from Maven Central): fills
# ~/.m2 and runs its JUnit tests once (~20 s cold, ~10 s warm), into a throw-away build directory.
# tests/integration/test_java_consumer.py builds it again for itself and would download the same.
java-deps: deps
	d=$$(mktemp -d) && mvn -B -ntp -f tests/java/pom.xml -Dpop3k.build.dir=$$d package; rc=$$?; rm -rf "$$d"; exit $$rc

demo: deps venv
	$(BIN)/python deploy/local/demo.py

demo-down:
	$(BIN)/python deploy/local/demo.py --down

stack-up: deps venv
	$(BIN)/python deploy/local/localstack.py up

stack-down:
	$(BIN)/python deploy/local/localstack.py down

# Build (once) and cache SeaweedFS's weed binary for the S3 object store the claim-check tests
# use: ~4-5 min cold on 2 cores, instant when ~/.cache/pop3-kafka/weed-<version>-<hash> exists.
# Needs Go >= the version in deploy/local/seaweedfs/go.mod (GO=/path/to/go to choose one).
objectstore:
	$(PY) deploy/local/objectstore.py fetch

# Fetch (mvn dependency:get into ~/.m2) and unpack Apicurio Registry into ~/.cache/pop3-kafka for the
# schema-registry tests: 3.3.3 on a Java 21+ (the Temurin JDK), else 2.6.13.Final on Java 17. Instant
# when cached; deploy/local/registry.py up/down runs one by hand.
registry:
	$(PY) deploy/local/registry.py fetch

# The full crash matrix (10 kills per named point + 200 random kill -9, ~20 min); writes
# bench/results/crash-matrix.md. CI runs a reduced one (tests/integration/test_crash_matrix.py).
crash-matrix: deps venv
	$(BIN)/python tests/crash_matrix.py --runs-per-point 10 --random-kills 200

# Mutation fuzzing of decoding: 10,000 seeded mutants of tests/fixtures/mail, each decoded, built
# and Avro-encoded in a child process (1 GiB address space, 5 s per mail); writes
# bench/results/fuzz.md. CI runs 600 (tests/unit/test_fuzz_decode.py).
fuzz: venv
	$(BIN)/python tests/fuzz_decode.py --mails 10000 --out bench/results/fuzz.md

# Large mail end to end at full size (CI runs 50 MB): chunked (exactly-once) and offloaded to a
# directory, at 50, 120 and 200 MB, against the real broker and Dovecot
# (tests/integration/test_large_mail_e2e.py).
large-mail: deps venv objectstore
	LARGE_MAIL_MB="50 120 200" $(BIN)/pytest tests/integration/test_large_mail_e2e.py -k "chunked_large_mail or offloaded_large_mail" -v --durations=0

# Scale-out at full size (CI runs 2 replicas, 6 mailboxes): three `run` replicas sharing 60
# mailboxes (own Dovecot with 60 users), kill -9 of one, takeover, restart and rejoin, every mail
# once, no [IN-USE] (tests/integration/test_scale_out.py; results in bench/results/scale_out.md).
scale-out: deps venv
	SCALE_OUT_REPLICAS=3 SCALE_OUT_MAILBOXES=60 $(BIN)/pytest tests/integration/test_scale_out.py -v --durations=0

# Issue 10: the connector side by side with the limits (raw pipelined RETR over TLS, the broker's
# produce limit) and its peers (stdlib poplib, getmail6, fetchmail) on five workloads, median of 5
# runs each, as the issue asks (~35 min on 2 cores); writes bench/results/compare.md,
# compare.json and compare.png. Uses the broker named by KAFKA_BOOTSTRAP, else starts one (Dovecot:
# always its own, with the bench users). Quick look: $(BIN)/python bench/compare.py --scale 0.05 --runs 1
BENCH_ARGS ?= --runs 5
bench: bench-deps
	GETMAIL=$(BENCH_VENV)/bin/getmail $(BIN)/python bench/compare.py $(BENCH_ARGS)

# The peers and tools of `make bench`: fetchmail and GNU time (peak RSS of each tool) from Debian,
# getmail6 from PyPI into its own venv (POP3K_BENCH_VENV, default ~/.cache/pop3-kafka/bench-venv),
# matplotlib (the bench extra) into .venv. Instant when all are there.
BENCH_APT_PACKAGES := fetchmail time
GETMAIL6_VERSION := 6.20.2
BENCH_VENV ?= $(or $(POP3K_BENCH_VENV),$(or $(POP3K_CACHE),$(HOME)/.cache/pop3-kafka)/bench-venv)
bench-deps: venv
	@need=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || need="$$need $$p"; done; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null; \
	    $$SUDO chmod 755 /usr/sbin/policy-rc.d; guard=1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$need; \
	  rc=$$?; if [ -n "$$guard" ]; then $$SUDO rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi
	@if [ ! -e "$(BENCH_VENV)/.getmail6-$(GETMAIL6_VERSION)" ]; then \
	  rm -rf "$(BENCH_VENV)" && $(PY) -m venv "$(BENCH_VENV)" && \
	  "$(BENCH_VENV)/bin/pip" install -q "getmail6==$(GETMAIL6_VERSION)" && \
	  touch "$(BENCH_VENV)/.getmail6-$(GETMAIL6_VERSION)"; \
	fi
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q -e '.[dev,bench]'

# One poll-once phase by phase next to the raw retrieval limit (bench/results/timeline.md): where
# the wall time of the ~24 KB mix goes in raw passthrough and full decode (issue 10).
bench-timeline: venv
	$(BIN)/python bench/timeline.py --runs 5

# The same for 5 x 50 MB (bench/results/timeline-mb50.md): the CPU the whole machine needs for
# the large-mail workload, which bounds the 50 MB target.
bench-timeline-mb50: venv
	$(BIN)/python bench/timeline.py --workload mb50 --runs 3

# The parser throughput table (bench/results/parsers.md); this was `make bench` before issue 10.
bench-parsers: venv
	$(BIN)/python bench/parsers.py

# Peak RSS growth of one poll-once cycle for one 1-200 MB mail, chunked and offload (issue 6:
# <= 64 MB at 50 and 200 MB); uses the stack named by KAFKA_BOOTSTRAP/DOVECOT_TEST_DIR, else starts
# one. Writes bench/results/large_mail.md and large_mail_rss.png; needs matplotlib (bench only).
bench-large-mail: venv
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/large_mail.py

# Issue 7: ONE process polling 500 mailboxes (its own Dovecot with users bench1..bench500) every
# 60 s while 2 mails/s arrive for 5 min: exactly-once check, schedule lag (p99 < 2 s), CPU per empty
# cycle, idle CPU (< 10 % of a core), peak RSS (< 300 MB). ~8 min; uses KAFKA_BOOTSTRAP's broker or
# starts one. Writes bench/results/many_mailboxes.md. Quick check: --mailboxes 50 --minutes 2.
bench-many-mailboxes: deps venv
	$(BIN)/python bench/many_mailboxes.py

# CPU per session of the TLS context, built per session vs re-used (bench/results/tls_context.md).
bench-tls-context: venv
	$(BIN)/python bench/tls_context.py

# CPU of the scheduling loop at 500 and 5000 mailboxes (no network), grouping cached vs per turn
# (bench/results/scheduler_loop.md). ~4 min.
bench-scheduler-loop: venv
	$(BIN)/python bench/scheduler_loop.py

# The chart's checking tools (helm, kubeconform, helm-unittest from the Go module proxy) and the
# Kubernetes/CRD schemas for kubeconform, built once into ~/.cache/pop3-kafka (cold: ~3 min on 2
# cores, warm: instant). tests/integration/test_helm_chart.py calls the same scripts.
helm-tools: venv
	deploy/tools/go-tools.sh >/dev/null
	$(BIN)/python deploy/tools/k8s-schemas.py >/dev/null

# The alerting rules: syntax and their unit tests (promtool from Debian's prometheus package).
rules: deps
	promtool check rules helm/pop3-kafka/files/prometheus-rules.yaml
	promtool test rules deploy/prometheus/rules_test.yaml

# Only where a Docker engine exists (not on these CI machines): the image and the compose stack.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' connector/__init__.py)
image:
	docker build -f deploy/Dockerfile -t pop3-kafka:$(VERSION) --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION=$$(git rev-parse HEAD) --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) .
compose-up:
	docker compose -f deploy/compose/compose.yaml up -d --build
compose-down:
	docker compose -f deploy/compose/compose.yaml down -v

# Release hygiene: build the wheel and the sdist (the version comes from connector/__init__.py
# only) and check their metadata with twine; CI runs it after the tests.
dist: venv
	rm -rf dist && $(BIN)/python -m build --outdir dist . >/dev/null && $(BIN)/twine check --strict dist/*

clean:
	rm -rf .stack .pytest_cache .mypy_cache .ruff_cache
