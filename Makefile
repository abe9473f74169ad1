# SmartGas: one entry point for running, testing and measuring the system on one machine.
#   make run    the local pipeline: consumer on its SQLite store + a small simulated fleet
#   make test   every test tier that runs here, installing what it needs first (what CI runs)
#   make bench  the consumer beside a bare aiocoap server (C load generator), OSCORE, workers, long history, MQTT
#   make bench-scale  one publisher process driving 10,000 meters on schedule
#   make e2e    (Docker machines) the compose stack up, the live suite against it, down again
# Everything installs into .venv from constraints.lock (the whole tree pinned; `make lock` makes it from
# constraints.txt), plus Debian packages via apt-get.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests use: gcc (the bench's C load generator), libcoap's client (interop),
# docker-compose (compose file validation), chromium (the dashboard in a headless browser), mosquitto
# (the MQTT broker of the MQTT tests and of `make run RUN_TRANSPORT=mqtt`; Debian's service is not started, the tests run their own), mosquitto-clients
# (mosquitto_sub: the compose broker's healthcheck, run against a real broker in test_deploy_stack.py).
# command:packages pairs (packages joined by +); the packages are installed when the command is missing,
# without Debian's recommended packages (chromium would bring udev, avahi and upgrades of systemd): the
# one recommendation the headless browser needs, a font, is named.
DEBIAN_TOOLS := gcc:gcc coap-client-notls:libcoap3-bin docker-compose:docker-compose chromium:chromium+fonts-liberation mosquitto:mosquitto mosquitto_sub:mosquitto-clients
RUN_DIR ?= var
RUN_PORT ?= 5683
RUN_HTTP_PORT ?= 8080
RUN_PERIOD ?= 2
RUN_LOG_READINGS ?= true
# How long `make run` waits for the consumer to answer before it gives up.
RUN_WAIT_S ?= 60
# oscore: every meter authenticated with its own OSCORE context, provisioned into RUN_DIR on first run
# (docs/security.md); none: plain CoAP from anyone (the original lab's protocol).
RUN_DEVICE_AUTH ?= oscore
# e.g. RUN_INJECT='--inject leak:bottle-0007 --inject offline:bottle-0012'
RUN_INJECT ?=
# coap: the meters PUT their readings to the consumer; mqtt: make also starts a Mosquitto on RUN_MQTT_PORT
# with the provisioned users and ACL, the meters publish to it, and the consumer subscribes (CoAP stays on).
RUN_TRANSPORT ?= coap
RUN_MQTT_PORT ?= 1883
RUN_BROKER := mqtt://127.0.0.1:$(RUN_MQTT_PORT)
ifeq ($(RUN_TRANSPORT),mqtt)
RUN_CONSUMER_MQTT := --mqtt-broker $(RUN_BROKER) --mqtt-credentials $(RUN_DIR)/device-credentials/mosquitto/consumer.json
RUN_PUBLISHER_TRANSPORT := --transport mqtt --broker $(RUN_BROKER) --credentials $(RUN_DIR)/meter-credentials
else ifeq ($(RUN_TRANSPORT),coap)
RUN_PUBLISHER_TRANSPORT := $(if $(filter oscore,$(RUN_DEVICE_AUTH)),--credentials $(RUN_DIR)/meter-credentials)
else
$(error RUN_TRANSPORT=$(RUN_TRANSPORT): must be coap or mqtt)
endif

.PHONY: help run test test-consumer test-publisher test-unit test-integration test-live lint typecheck deps venv bench bench-history bench-mqtt bench-scale e2e clean

help:
	@grep -hE '^#   make' Makefile mk/*.mk | sed 's/^#   //'

# --- installation -----------------------------------------------------------------------------------

deps:
	@missing=""; \
	for tool in $(DEBIAN_TOOLS); do \
	  command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool#*:}"; \
	  missing=$${missing//+/ }; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python constraints.lock common/pyproject.toml consumer/pyproject.toml publisher/pyproject.toml
	$(BIN)/pip install -q -c constraints.lock -e 'common[test]' -e 'consumer[test]' -e 'publisher[test]' ruff mypy types-PyYAML py-spy
	touch $@

venv: $(VENV)/.installed

# --- the main job -----------------------------------------------------------------------------------

# The two services run in sessions of their own (setsid), so a terminal's Ctrl-C (or a SIGTERM to make's
# process group, which make repeats to this shell) reaches them only through this shell, which asks each
# exactly once: the trap only notes the request, the loop below acts on it. The publisher starts once the
# consumer answers on HTTP (it starts last), at most RUN_WAIT_S seconds; then a stop request makes the
# publisher deliver what it holds, then the consumer commits and exits. With RUN_TRANSPORT=mqtt a Mosquitto
# starts first (its own session too) and stops last, when the recipe's shell exits (the EXIT trap).
# A fresh administrator key is made for each run and handed to the dashboard in the URL's fragment.
run: venv
	@mkdir -p $(RUN_DIR)
	@set -o pipefail; $(BIN)/smartgas-consumer provision-meters --fleet fleet/fleet.yaml \
	    --device-credentials $(RUN_DIR)/device-credentials --meter-credentials $(RUN_DIR)/meter-credentials | tail -n 1
	@key=$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(24))'); \
	url="http://127.0.0.1:$(RUN_HTTP_PORT)/dashboard/#key=$$key"; \
	stop_requested=""; trap 'stop_requested=1' INT TERM; \
	broker=""; trap '[ -z "$$broker" ] || { kill -INT $$broker 2>/dev/null; wait $$broker; }' EXIT; \
	echo "SmartGas: consumer on coap://127.0.0.1:$(RUN_PORT) (store $(RUN_DIR)/smartgas.db), the meters of"; \
	echo "fleet/fleet.yaml every $(RUN_PERIOD) s over $(RUN_TRANSPORT). Ctrl-C stops them. Dashboard:"; \
	echo "    $$url"; \
	if [ "$(RUN_TRANSPORT)" = mqtt ]; then \
	  echo "MQTT broker on $(RUN_BROKER) (Mosquitto, log $(RUN_DIR)/mosquitto/mosquitto.log)"; \
	  setsid $(BIN)/python -m smartgas_common.mosquitto --directory $(RUN_DIR)/mosquitto --port $(RUN_MQTT_PORT) \
	      --password-file $(RUN_DIR)/device-credentials/mosquitto/password_file \
	      --acl-file $(RUN_DIR)/device-credentials/mosquitto/acl_file & broker=$$!; \
	  deadline=$$(( $$(date +%s) + $(RUN_WAIT_S) )); \
	  until $(BIN)/python -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
	      $(RUN_MQTT_PORT) 2>/dev/null; do \
	    if ! kill -0 $$broker 2>/dev/null; then \
	      wait $$broker; broker=""; echo "make run: the MQTT broker stopped before it listened (see above and" \
	        "$(RUN_DIR)/mosquitto/mosquitto.log; RUN_MQTT_PORT=$(RUN_MQTT_PORT) may be taken)" >&2; exit 1; fi; \
	    if [ -n "$$stop_requested" ] || [ $$(date +%s) -ge $$deadline ]; then \
	      [ -n "$$stop_requested" ] || echo "make run: the MQTT broker did not listen on $(RUN_BROKER)" \
	        "within RUN_WAIT_S=$(RUN_WAIT_S) s" >&2; \
	      [ -n "$$stop_requested" ]; exit; fi; \
	    sleep 0.2; \
	  done; \
	fi; \
	SMARTGAS_CONSUMER_ADMIN_KEY=$$key setsid $(BIN)/smartgas-consumer serve --coap-host 127.0.0.1 \
	    --coap-port $(RUN_PORT) --http-port $(RUN_HTTP_PORT) --db $(RUN_DIR)/smartgas.db --fleet fleet/fleet.yaml \
	    --expected-period $(RUN_PERIOD) --log-readings $(RUN_LOG_READINGS) --device-auth $(RUN_DEVICE_AUTH) \
	    --device-credentials $(RUN_DIR)/device-credentials $(RUN_CONSUMER_MQTT) & consumer=$$!; \
	deadline=$$(( $$(date +%s) + $(RUN_WAIT_S) )); \
	until $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
	    "http://127.0.0.1:$(RUN_HTTP_PORT)/healthz" >/dev/null 2>&1; do \
	  if ! kill -0 $$consumer 2>/dev/null; then \
	    wait $$consumer; echo "make run: the consumer stopped before it answered (its error is above)" >&2; exit 1; fi; \
	  if [ -n "$$stop_requested" ] || [ $$(date +%s) -ge $$deadline ]; then \
	    [ -n "$$stop_requested" ] || echo "make run: the consumer did not answer on" \
	      "http://127.0.0.1:$(RUN_HTTP_PORT)/healthz within RUN_WAIT_S=$(RUN_WAIT_S) s; stopping it" >&2; \
	    kill -INT $$consumer; while kill -0 $$consumer 2>/dev/null; do sleep 0.2; done; \
	    wait $$consumer; [ -n "$$stop_requested" ]; exit; fi; \
	  sleep 0.2; \
	done; \
	setsid $(BIN)/smartgas-publisher --consumer coap://127.0.0.1:$(RUN_PORT) --fleet fleet/fleet.yaml \
	    --period $(RUN_PERIOD) $(RUN_INJECT) $(RUN_PUBLISHER_TRANSPORT) \
	    & publisher=$$!; \
	if [ -n "$$DISPLAY" ] && command -v xdg-open >/dev/null; then xdg-open "$$url" >/dev/null 2>&1 || true; fi; \
	asked=""; \
	while kill -0 $$publisher 2>/dev/null; do \
	  if [ -z "$$stop_requested" ] && ! kill -0 $$consumer 2>/dev/null; then \
	    stop_requested=1; echo "make run: the consumer stopped (its error is above); stopping the publisher" >&2; fi; \
	  if [ -n "$$stop_requested" ] && [ -z "$$asked" ]; then asked=1; kill -INT $$publisher; fi; \
	  sleep 0.2; \
	done; \
	wait $$publisher; published=$$?; \
	kill -INT $$consumer 2>/dev/null; while kill -0 $$consumer 2>/dev/null; do sleep 0.2; done; \
	wait $$consumer; consumed=$$?; \
	[ $$consumed -eq 0 ] && { [ -n "$$stop_requested" ] || [ $$published -eq 0 ]; }

# --- tests ------------------------------------------------------------------------------------------

# Each package's suite runs through `python setup.py test`, as the original lab did. Lint, typecheck and
# the three suites run side by side (make -j; each one's output is printed whole when it ends), and the
# consumer's suite spreads its test files over TEST_WORKERS pytest-xdist workers. The Elasticsearch zip
# is fetched first (mk/elasticsearch.mk), so the real-node tests find it.
TEST_WORKERS ?= 2
test: deps venv elasticsearch-zip
	@$(MAKE) --no-print-directory -j 4 --output-sync=target lint typecheck test-common test-consumer test-publisher

test-common: venv
	cd common && ../$(BIN)/python setup.py -q test

test-consumer: venv
	cd consumer && ../$(BIN)/python setup.py -q test --pytest-args="-n $(TEST_WORKERS) --dist loadfile"

test-publisher: venv
	cd publisher && ../$(BIN)/python setup.py -q test

test-unit: venv
	$(BIN)/python -m pytest -q -m 'not integration and not live' consumer/tests publisher/tests

test-integration: deps venv
	$(BIN)/python -m pytest -q -m integration consumer/tests publisher/tests

# Needs ELASTICSEARCH_URL (and KIBANA_URL); without them every live test is skipped by name.
test-live: venv
	$(BIN)/python -m pytest -q -m live -rs consumer/tests

lint: venv
	$(BIN)/ruff check common consumer publisher
	$(BIN)/ruff format --check common consumer publisher

typecheck: venv
	$(BIN)/mypy common/src consumer/src publisher/src

# On a machine with Docker: bring the whole stack up, check its data path (the publisher's meters'
# readings in the readings data stream, the dashboard and data views in Kibana), run the live suite
# against it, and tear it down with its volumes on every path, failures included (deploy/e2e.sh).
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
E2E_WAIT_S ?= 600
e2e: venv
	COMPOSE="$(COMPOSE)" PYTHON=$(BIN)/python E2E_WAIT_S=$(E2E_WAIT_S) bash deploy/e2e.sh

# Ingest throughput, acknowledgement latency, drops and memory of the consumer side by side with a bare
# aiocoap server, driven by a C load generator (consumer/bench/coapload.c, built here); then the consumer
# on a store with a long history (bench-history) and MQTT ingest beside CoAP (bench-mqtt). See
# docs/benchmarks.md. BENCH_SUSTAIN_S: the sustained run's length (300 s);
# BENCH_WORKERS: the multi-process row.
BENCH_SUSTAIN_S ?= 300
BENCH_WORKERS ?= $(shell nproc)
$(BIN)/coapload: consumer/bench/coapload.c | $(BIN)/python
	gcc -O2 -Wall -o $@ $<

bench: venv $(BIN)/coapload
	BENCH_SUSTAIN_S=$(BENCH_SUSTAIN_S) $(BIN)/python consumer/bench/bench_compare.py --generator $(BIN)/coapload \
	    --workers $(BENCH_WORKERS)
	@$(MAKE) --no-print-directory bench-history
	@$(MAKE) --no-print-directory bench-mqtt

# The consumer on a store whose 1,000 meters hold 2,000 readings each (~5.5 h at 10 s), beside a new store:
# readings/s, CPU and disk bytes written per reading (consumer/bench/bench_history.py).
bench-history: venv $(BIN)/coapload
	$(BIN)/python consumer/bench/bench_history.py --generator $(BIN)/coapload

# MQTT ingest beside CoAP: one consumer fed by the publisher over each transport in turn, through a real
# Mosquitto; every reading acknowledged checked in the store (consumer/bench/bench_mqtt.py).
bench-mqtt: deps venv
	$(BIN)/python consumer/bench/bench_mqtt.py --meters 200 --readings 25

# The publisher as a load source (issue 12 item 5): 10,000 meters every 10 s from one process against a
# real consumer, send delays against the schedule, plain CoAP then OSCORE (publisher/bench/bench_scale.py).
bench-scale: venv
	$(BIN)/python publisher/bench/bench_scale.py --meters 10000 --period 10 --readings 6 --device-auth both

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(RUN_DIR) .mypy_cache .ruff_cache */.pytest_cache */src/*.egg-info

# The real Elasticsearch node of the test suite (included last: `make` alone stays `make help`).
include mk/elasticsearch.mk
include mk/lock.mk
