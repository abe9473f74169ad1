#!/usr/bin/env bash
# `make e2e`: the compose stack up, its data path checked, the live suite against it, and the stack down
# again with its volumes — on every path, failures included (an EXIT trap). On failure the services' last
# log lines are printed first.
#
# The data path: the publisher's meters (coapclient) → the consumer (coapserver) → documents in the
# readings data stream, from at least E2E_MIN_METERS distinct meters; then kibana-setup has exited 0 and
# Kibana has the dashboard and the data views (test_live_compose.py checks both through the real APIs).
#
# Settings (environment): COMPOSE (the compose command), PYTHON (with pytest), E2E_WAIT_S (the longest wait
# for each stage), E2E_MIN_METERS. The stack's own settings come from .env.
set -uo pipefail
cd "$(dirname "$0")/.."

COMPOSE=${COMPOSE:-docker compose}
PYTHON=${PYTHON:-.venv/bin/python}
E2E_WAIT_S=${E2E_WAIT_S:-600}
E2E_MIN_METERS=${E2E_MIN_METERS:-10}
status=1

cleanup() {
  if [ "$status" -ne 0 ]; then
    echo "e2e: failed (exit $status); the services' last log lines:"
    $COMPOSE ps || true
    $COMPOSE logs --no-color --tail 80 || true
  fi
  echo "e2e: removing the stack and its volumes"
  $COMPOSE down -v --remove-orphans || true
  exit "$status"
}
trap cleanup EXIT
trap 'status=130; exit' INT TERM

set -a
# shellcheck disable=SC1091
. ./.env
set +a

# wait_for DESCRIPTION COMMAND...: run COMMAND every 5 s until it succeeds, for at most E2E_WAIT_S.
wait_for() {
  local what=$1 deadline=$(($(date +%s) + E2E_WAIT_S))
  shift
  until "$@"; do
    if [ "$(date +%s)" -gt "$deadline" ]; then
      echo "e2e: $what: not reached in ${E2E_WAIT_S} s"
      return 1
    fi
    sleep 5
  done
  echo "e2e: $what"
}

consumer_healthy() {
  [ "$(docker inspect --format '{{.State.Health.Status}}' coapserver 2>/dev/null)" = healthy ]
}

kibana_setup_done() {
  local id
  id=$($COMPOSE ps -q kibana-setup 2>/dev/null) || return 1
  [ -n "$id" ] && [ "$(docker inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$id")" = "exited 0" ]
}

$COMPOSE up -d --build || { status=$?; exit; }
wait_for "the consumer is healthy" consumer_healthy || exit
wait_for "the Kibana import is done" kibana_setup_done || exit

export ELASTICSEARCH_URL="http://127.0.0.1:${ES_PORT}" KIBANA_URL="http://127.0.0.1:${KIBANA_PORT}"
export SMARTGAS_E2E=1 E2E_MIN_METERS E2E_WAIT_S
"$PYTHON" -m pytest -m live -rs consumer/tests
status=$?
