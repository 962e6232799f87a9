#!/usr/bin/env bash
# The deployment smoke test, run for real (`make docker-smoke`). See docs/deploy.md.
#
# Starts a Docker engine if none answers (installing Debian's docker.io when dockerd is missing), makes the
# base image with debootstrap (cached), builds the CPU images (torch from docker/wheelhouse/, never a CUDA
# wheel) and the Prometheus image (its build checks the configuration and unit-tests the alerting rules), then:
#   0. the CUDA service image (`make docker-build-gpu`'s, PyPI's CUDA torch; cached after the first build):
#      runs it without `--gpus` and checks it serves on CPU (/readyz, one POST /v1/act), then stops it;
#   1. one service (docker-compose.cpu.yml): waits healthy, drives sessions with trmrl-sim (from the host's
#      venv, against the mapped port, with an API key), checks 401 without it, scrapes /metrics, restarts
#      the container and checks the sessions continue (same ids, same memory, no recovery), runs the
#      `demo` profile (trmrl-sim inside the image) and the `train` profile (a short training run published
#      to the checkpoint volume, served after a restart);
#   2. two replicas behind the nginx router (docker-compose.scale.yml): drives sessions through the router
#      (HTTP and WebSocket), checks both replicas got sessions (their own /metrics); upgrades the fleet while
#      sessions step through the router (the router refuses an admin call: 421 admin_on_replica; a new
#      version of point-nav loaded, activated with migrate_sessions, rolled back and retired on every
#      replica through its own port; no failed step, no step conflict, the versions switch between two
#      steps, memories and step counters carry on; a user key gets 403 on the admin routes); with the
#      `monitoring` profile, checks that Prometheus holds every replica's series (up, trmrl_steps_total per
#      instance) and its rules are loaded; kills one replica and checks the clients recover and Prometheus
#      raises TrmrlReplicasMissing;
# and tears everything down, also on failure. Prints timings and image sizes.
#
# Settings (environment): SMOKE_PORT (18000), SMOKE_ROUTER_PORT (18080), SMOKE_CUDA_PORT (18001),
# SMOKE_PROMETHEUS_PORT (19090), SMOKE_VENV (.venv: the host venv with trmrl-sim), SMOKE_TORCH_WHEEL
# (/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl), SMOKE_KEEP_IMAGES (1: images stay,
# they are the build cache), SMOKE_ENVS (8), SMOKE_CUDA (1; 0 skips the CUDA image: its first build
# downloads several GB).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${SMOKE_PORT:-18000}"
ROUTER_PORT="${SMOKE_ROUTER_PORT:-18080}"
CUDA_PORT="${SMOKE_CUDA_PORT:-18001}"
PROMETHEUS_PORT="${SMOKE_PROMETHEUS_PORT:-19090}"
VENV="${SMOKE_VENV:-.venv}"
ENVS="${SMOKE_ENVS:-8}"
TORCH_WHEEL="${SMOKE_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
PROJECT=trmrlsmoke
LOGS=docker/smoke-logs
BASE_TAG=trmrl/debian-python:bookworm
SERVICE_TAG=trmrl/service:cpu
TRAINER_TAG=trmrl/trainer:cpu
ROUTER_TAG=trmrl/router:local
PROMETHEUS_TAG=trmrl/prometheus:local
CUDA_TAG=trmrl/service:cuda
CUDA_CONTAINER="$PROJECT-cuda"
mkdir -p "$LOGS"

T_START=$(date +%s)
TIMINGS=()
step() { printf '\n=== %s (%ss) ===\n' "$*" "$(($(date +%s) - T_START))"; }
timed() { # timed LABEL COMMAND...: run, record its duration
    local label="$1" t0 t1 rc=0
    shift
    t0=$(date +%s.%N)
    "$@" || rc=$?
    t1=$(date +%s.%N)
    TIMINGS+=("$(awk -v l="$label" -v a="$t0" -v b="$t1" 'BEGIN {printf "%-48s %7.1f s", l, b - a}')")
    return "$rc"
}
fail() { echo "SMOKE FAILED: $*" >&2; exit 1; }
to_file() { # to_file FILE COMMAND...: run, keep its output in FILE and show it, keep its status
    local out="$1" rc=0
    shift
    "$@" >"$out" || rc=$?
    cat "$out"
    return "$rc"
}

# -- the engine and compose ------------------------------------------------------------------------------
step "docker engine"
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    echo "starting dockerd (log: $LOGS/dockerd.log)"
    nohup dockerd >"$LOGS/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$LOGS/dockerd.log"; fail "dockerd did not start"; }
fi
docker version --format 'client {{.Client.Version}}, engine {{.Server.Version}}'
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    COMPOSE=(docker-compose)
fi
echo "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -1))"
# Without the buildx plugin the classic builder builds (the Dockerfiles use no BuildKit-only syntax).
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
[ -x "$VENV/bin/trmrl-sim" ] || make venv
SIM="$VENV/bin/trmrl-sim"
PY="$VENV/bin/python"

SINGLE=(-p "$PROJECT" -f docker-compose.cpu.yml)
SCALED=(-p "$PROJECT" -f docker-compose.cpu.yml -f docker-compose.scale.yml --profile monitoring)
KEY="smoke-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
ADMIN_KEY="smoke-admin-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
ENV_FILE="$LOGS/smoke.env"
cleanup() {
    local rc=$?
    set +e
    step "teardown (exit $rc)"
    for cfg in SCALED SINGLE; do
        local -n files="$cfg"
        "${COMPOSE[@]}" "${files[@]}" --profile demo --profile train logs --no-color >"$LOGS/compose-$cfg.log" 2>&1
        "${COMPOSE[@]}" "${files[@]}" --profile demo --profile train down -v --remove-orphans >/dev/null 2>&1
    done
    if docker container inspect "$CUDA_CONTAINER" >/dev/null 2>&1; then
        docker logs "$CUDA_CONTAINER" >"$LOGS/cuda-service.log" 2>&1
        docker rm -f "$CUDA_CONTAINER" >/dev/null 2>&1
    fi
    rm -f "$ENV_FILE"
    [ "${SMOKE_KEEP_IMAGES:-1}" = 1 ] ||
        docker image rm "$PROMETHEUS_TAG" "$ROUTER_TAG" "$TRAINER_TAG" "$SERVICE_TAG" "$CUDA_TAG" >/dev/null 2>&1
    if [ "$rc" = 0 ]; then echo "SMOKE PASSED in $(($(date +%s) - T_START)) s"; else echo "SMOKE FAILED (exit $rc); logs in $LOGS/"; fi
}
trap cleanup EXIT

export TRMRL_ENV_FILE="$ENV_FILE" TRMRL_IMAGE="$SERVICE_TAG" TRMRL_TRAINER_IMAGE="$TRAINER_TAG" \
    TRMRL_ROUTER_IMAGE="$ROUTER_TAG" TRMRL_ROUTER_BASE_IMAGE="$BASE_TAG" \
    TRMRL_PROMETHEUS_IMAGE="$PROMETHEUS_TAG" TRMRL_PROMETHEUS_BASE_IMAGE="$BASE_TAG" \
    TRMRL_PROMETHEUS_PUBLISH="127.0.0.1:$PROMETHEUS_PORT:9090"
cat >"$ENV_FILE" <<EOF
TRMRL_API_KEYS=$KEY
TRMRL_ADMIN_KEYS=$ADMIN_KEY
TRMRL_CHECKPOINT_ROOT=/var/lib/trmrl/checkpoints
TRMRL_DEVICE=cpu
TRMRL_LOG_FORMAT=json
TRMRL_TORCH_THREADS=1
TRMRL_DRAIN_GRACE_S=1
EOF

step "compose files are valid"
for files in "docker-compose.yml" "docker-compose.cpu.yml" "docker-compose.yml docker-compose.scale.yml" \
    "docker-compose.cpu.yml docker-compose.scale.yml"; do
    args=()
    for f in $files; do args+=(-f "$f"); done
    "${COMPOSE[@]}" "${args[@]}" --profile train --profile demo --profile monitoring config -q || fail "compose config: $files"
    echo "ok: $files"
done

# -- images ----------------------------------------------------------------------------------------------
step "images"
timed "base image (debootstrap + import; cached)" docker/make-base-image.sh "$BASE_TAG"
if ! ls docker/wheelhouse/torch-*+cpu-*.whl >/dev/null 2>&1; then
    [ -f "$TORCH_WHEEL" ] || fail "no CPU torch wheel: set SMOKE_TORCH_WHEEL or fill docker/wheelhouse/ (its README)"
    cp "$TORCH_WHEEL" docker/wheelhouse/
fi
# A TLS-intercepting proxy's CA, if this host trusts one, for the build stage's pip.
for c in /usr/local/share/ca-certificates/*.crt; do [ -f "$c" ] && cp "$c" docker/certs/; done
build() { # build NAME DOCKER-BUILD-ARGS...: the log in $LOGS/build-NAME.log, its tail on failure
    local log="$LOGS/build-$1.log"
    shift
    docker build "$@" >"$log" 2>&1 || { tail -30 "$log"; return 1; }
    echo "built $(grep -oE 'Successfully tagged .*|naming to [^ ]+' "$log" | tail -1)"
}
timed "build $SERVICE_TAG" build service -f docker/service.Dockerfile -t "$SERVICE_TAG" \
    --build-arg BASE_IMAGE="$BASE_TAG" \
    --build-arg TORCH_PIP_ARGS="--no-deps --no-index --find-links /wheelhouse" .
timed "build $TRAINER_TAG" build trainer -f docker/trainer.Dockerfile -t "$TRAINER_TAG" \
    --build-arg SERVICE_IMAGE="$SERVICE_TAG" .
timed "build $ROUTER_TAG" build router -f docker/router.Dockerfile -t "$ROUTER_TAG" --build-arg BASE_IMAGE="$BASE_TAG" .
timed "build $PROMETHEUS_TAG (promtool checks)" build prometheus -f docker/prometheus.Dockerfile -t "$PROMETHEUS_TAG" \
    --build-arg BASE_IMAGE="$BASE_TAG" .
# The build ran promtool check config/rules and the rules' unit tests; check the configuration once more.
docker run --rm --entrypoint promtool "$PROMETHEUS_TAG" check config /etc/prometheus/prometheus.yml \
    >"$LOGS/promtool.txt" 2>&1 || { cat "$LOGS/promtool.txt"; fail "promtool check config"; }
echo "prometheus image: $(docker run --rm --entrypoint prometheus "$PROMETHEUS_TAG" --version 2>&1 | head -1)"
echo "prometheus image: promtool check config: valid; $(awk '/^Checking/ {f = $2; sub(/.*\//, "", f)}
    /SUCCESS: [0-9]+ rules found/ {printf "%s%s %d rules", sep, f, $2; sep = ", "}' "$LOGS/promtool.txt")"
docker run --rm --entrypoint python3 "$SERVICE_TAG" -c \
    'import os, torch; assert torch.version.cuda is None, torch.version.cuda; assert os.getuid() == 10001; print("service image: torch", torch.__version__, "(CPU build), uid", os.getuid())'
docker run --rm --entrypoint sh "$SERVICE_TAG" -c '! command -v gcc && ! command -v pip && echo "service image: no compiler, no pip"'

wait_url() { # wait_url SECONDS URL: until URL answers 2xx
    local limit="$1" url="$2" t0
    t0=$(date +%s)
    until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
        [ $(($(date +%s) - t0)) -lt "$limit" ] || return 1
        sleep 0.5
    done
}
wait_healthy() { # wait_healthy SECONDS COMPOSE_ARGS...: every container of the project running and healthy
    local limit="$1"
    shift
    local t0 ids st bad
    t0=$(date +%s)
    while :; do
        ids=$("${COMPOSE[@]}" "$@" ps -q)
        bad=0
        for id in $ids; do
            st=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
            case "$st" in running/healthy | running/none) ;; *) bad=1 ;; esac
        done
        [ -n "$ids" ] && [ "$bad" = 0 ] && return 0
        [ $(($(date +%s) - t0)) -lt "$limit" ] || { "${COMPOSE[@]}" "$@" ps; return 1; }
        sleep 1
    done
}
metric() { # metric URL NAME: the sum of a metric's samples
    curl -fsS "$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 {s += $2} END {printf "%d\n", s}'
}
sim() { # sim URL TRANSPORT LABEL [ARGS...]: trmrl-sim from the host venv, its summary and JSON kept
    local url="$1" transport="$2" label="$3"
    shift 3
    "$SIM" --url "$url" --api-key "$KEY" --family point-nav --envs "$ENVS" --episodes 2 --transport "$transport" \
        --no-progress --json "$LOGS/sim-$label.json" "$@" | tee "$LOGS/sim-$label.txt" | tail -4
}

# -- 0. the CUDA image serves on CPU -------------------------------------------------------------------
# The image a GPU host runs (make docker-build-gpu: PyPI's CUDA torch on the Debian base), started here
# without --gpus: the CUDA build of torch finds no device and the service (TRMRL_DEVICE=auto) runs on CPU.
if [ "${SMOKE_CUDA:-1}" = 1 ]; then
    step "CUDA image: build, then serve on CPU (no --gpus)"
    timed "build $CUDA_TAG (PyPI CUDA torch)" build service-cuda -f docker/service.Dockerfile -t "$CUDA_TAG" \
        --build-arg BASE_IMAGE="$BASE_TAG" --build-arg TORCH_WHEELHOUSE=docker/wheelhouse/README.md .
    docker run --rm --entrypoint python3 "$CUDA_TAG" -c \
        'import os, torch; assert torch.version.cuda, "not a CUDA build"; assert os.getuid() == 10001; print("cuda image: torch", torch.__version__, "CUDA", torch.version.cuda, "| device available here:", torch.cuda.is_available())'
    docker rm -f "$CUDA_CONTAINER" >/dev/null 2>&1 || true
    timed "cuda: docker run (no --gpus)" docker run -d --name "$CUDA_CONTAINER" -p "127.0.0.1:$CUDA_PORT:8000" \
        -e TRMRL_API_KEYS="$KEY" -e TRMRL_LOG_FORMAT=json -e TRMRL_TORCH_THREADS=1 "$CUDA_TAG" >/dev/null
    timed "cuda: ready (/readyz)" wait_url 180 "http://127.0.0.1:$CUDA_PORT/readyz" ||
        { docker logs "$CUDA_CONTAINER" 2>&1 | tail -20; fail "the CUDA image did not become ready in 180 s"; }
    timed "cuda: one POST /v1/act" "$PY" docker/smoke_checks.py act "http://127.0.0.1:$CUDA_PORT" --api-key "$KEY" ||
        fail "the CUDA image did not answer /v1/act"
    on_cpu=$(docker logs "$CUDA_CONTAINER" 2>&1 | grep -c '"message": "model .* on cpu: ' || true)
    [ "$on_cpu" -gt 0 ] || fail "the CUDA image loaded no model on cpu"
    echo "cuda image: $on_cpu models loaded on cpu (TRMRL_DEVICE=auto, no GPU in the container)"
    timed "cuda: docker stop" docker stop -t 60 "$CUDA_CONTAINER" >/dev/null
    docker logs "$CUDA_CONTAINER" >"$LOGS/cuda-service.log" 2>&1
    docker rm "$CUDA_CONTAINER" >/dev/null
fi

# -- 1. one service --------------------------------------------------------------------------------------
step "single service: up"
export TRMRL_PUBLISH="127.0.0.1:$PORT:8000"
URL="http://127.0.0.1:$PORT"
timed "single: compose up" "${COMPOSE[@]}" "${SINGLE[@]}" up -d
timed "single: healthy (/readyz via HEALTHCHECK)" wait_healthy 180 "${SINGLE[@]}"
CID=$("${COMPOSE[@]}" "${SINGLE[@]}" ps -q trmrl)
docker exec "$CID" id -u | grep -qx 10001 || fail "the service does not run as uid 10001"

step "single service: trmrl-sim (batch transport)"
timed "single: trmrl-sim $ENVS envs x 2 episodes (batch)" sim "$URL" batch single-batch
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$URL/v1/sessions" -H 'content-type: application/json' -d '{}')
[ "$code" = 401 ] || fail "POST /v1/sessions without a key answered $code, expected 401"
echo "without the API key: 401"

step "single service: /metrics"
curl -fsS "$URL/metrics" >"$LOGS/metrics-single.txt"
steps_total=$(metric "$URL" trmrl_steps_total)
[ "$steps_total" -gt 0 ] || fail "trmrl_steps_total is $steps_total after driving sessions"
grep -E '^trmrl_(steps_total|forward_passes_total|active_sessions)' "$LOGS/metrics-single.txt" | head -8
echo "trmrl_steps_total = $steps_total"

step "single service: restart the container, sessions continue"
timed "single: sessions across docker restart" to_file "$LOGS/restart.json" "$PY" docker/smoke_driver.py --url "$URL" --api-key "$KEY" \
    --sessions 8 --steps 10 --expect continue --ready-url "$URL/readyz" \
    --disrupt "docker restart -t 60 $CID >/dev/null"
docker logs "$CID" 2>&1 | grep -E '"(wrote|restored) [0-9]+' | tail -2
timed "single: trmrl-sim after restart (ws)" sim "$URL" ws single-ws

step "single service: profiles demo and train"
timed "single: profile demo (trmrl-sim in the image)" \
    "${COMPOSE[@]}" "${SINGLE[@]}" --profile demo run --rm demo \
    --url http://trmrl:8000 --family point-nav --envs 4 --episodes 1 --no-progress >"$LOGS/demo.txt" 2>&1 ||
    { tail -20 "$LOGS/demo.txt"; fail "profile demo"; }
tail -3 "$LOGS/demo.txt"
timed "single: profile train (short run, publish)" \
    "${COMPOSE[@]}" "${SINGLE[@]}" --profile train run --rm trainer small-point-nav smoke-trained \
    --total-steps 2048 >"$LOGS/train.txt" 2>&1 || { tail -20 "$LOGS/train.txt"; fail "profile train"; }
grep -E '^(trained|published)' "$LOGS/train.txt"
docker restart -t 60 "$CID" >/dev/null
for _ in $(seq 1 120); do curl -fsS "$URL/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
curl -fsS -H "Authorization: Bearer $KEY" "$URL/v1/models" | grep -q '"name":"smoke-trained"' ||
    fail "the service does not serve the trained checkpoint after a restart"
echo "the service serves the trained checkpoint smoke-trained after a restart"
timed "single: trmrl-sim on the trained model" sim "$URL" batch single-trained --model smoke-trained
timed "single: compose down -v" "${COMPOSE[@]}" "${SINGLE[@]}" --profile demo --profile train down -v --remove-orphans

# -- 2. two replicas behind the router -------------------------------------------------------------------
step "scale-out: 2 replicas behind nginx"
export TRMRL_PUBLISH="127.0.0.1::8000" TRMRL_ROUTER_PUBLISH="127.0.0.1:$ROUTER_PORT:8080" TRMRL_REPLICAS=2
RURL="http://127.0.0.1:$ROUTER_PORT"
timed "scale: up (2 replicas + router + prometheus)" "${COMPOSE[@]}" "${SCALED[@]}" up -d --scale trmrl=2
timed "scale: healthy" wait_healthy 180 "${SCALED[@]}"
mapfile -t REPLICAS < <("${COMPOSE[@]}" "${SCALED[@]}" ps -q trmrl)
[ "${#REPLICAS[@]}" = 2 ] || fail "expected 2 replicas, got ${#REPLICAS[@]}"
timed "scale: trmrl-sim through the router (http)" sim "$RURL" http scale-http
timed "scale: trmrl-sim through the router (ws)" sim "$RURL" ws scale-ws
for id in "${REPLICAS[@]}"; do
    p=$(docker port "$id" 8000/tcp | head -1 | sed 's/.*://')
    n=$(metric "http://127.0.0.1:$p" trmrl_steps_total)
    echo "replica $(docker inspect -f '{{.Name}}' "$id"): trmrl_steps_total = $n"
    [ "$n" -gt 0 ] || fail "replica $id got no steps: the router does not spread sessions"
done

step "scale-out: upgrade every replica while sessions step through the router"
# The router refuses admin calls (421 admin_on_replica, checked by the driver): each replica is upgraded
# through its own published port.
REPLICA_URLS=()
for id in "${REPLICAS[@]}"; do
    REPLICA_URLS+=("http://127.0.0.1:$(docker port "$id" 8000/tcp | head -1 | sed 's/.*://')")
done
# The admin routes take admin keys only: a user key gets 403 (on a replica's own port).
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "${REPLICA_URLS[0]}/v1/admin/models" \
    -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
    -d '{"name": "point-nav", "checkpoint": "upgrades/point-nav-v2"}')
[ "$code" = 403 ] || fail "an admin call with a user key answered $code, expected 403"
echo "admin route with a user key (on a replica): 403"
# The new version: point-nav with its weights nudged (same sizes, a new content hash), written once into the
# checkpoints volume every replica mounts (TRMRL_CHECKPOINT_ROOT), in a sub-directory: not a model of its own.
docker exec -i "${REPLICAS[0]}" python3 - /var/lib/trmrl/checkpoints/point-nav \
    /var/lib/trmrl/checkpoints/upgrades/point-nav-v2 <<'PY' || fail "writing the new version of point-nav"
import dataclasses, sys
import torch
from trmrl.checkpoint import load_checkpoint, save_checkpoint
src, dst = sys.argv[1:3]
old = load_checkpoint(src)
torch.manual_seed(17)
with torch.no_grad():
    for p in old.model.parameters():
        if p.numel() > 1:
            p.add_(0.01 * p.std() * torch.randn_like(p))
training = {**old.info.training, "derived_from": old.info.version}
info = dataclasses.replace(old.info, created_at="", content_hash="", training=training)
new = save_checkpoint(dst, old.model, info)
print(f"new version of point-nav: {new.version} (from {old.info.version}) in {dst}")
PY
timed "scale: upgrade + rollback, sessions stepping" to_file "$LOGS/upgrade.json" "$PY" docker/smoke_driver.py \
    --url "$RURL" --api-key "$KEY" --expect upgrade --sessions 32 --rounds 10 --min-upstreams 2 \
    --admin-key "$ADMIN_KEY" --checkpoint upgrades/point-nav-v2 "${REPLICA_URLS[@]/#/--replica-url=}"
"$PY" - "$LOGS/upgrade.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
v, sw, a = r["versions"], r["switch_step"], r["admin_via_router"]
print(f"upgrade: an admin call through the router (admin key): {a['status']} {a['code']}; no replica changed")
print(f"upgrade: {r['sessions']} sessions stepping through the router on {len(r['replicas'])} replicas, "
      f"{r['steps']} steps in {r['upgrade_s']} s: {r['failed_steps']} failed, {r['step_conflicts']} conflicts; "
      f"step latency p50 {r['step_latency_ms']['p50']} ms, p99 {r['step_latency_ms']['p99']} ms, max {r['step_latency_ms']['max']} ms")
print(f"upgrade: each session's replies switch once from {v['v1']} to {v['v2']} (first step on it: "
      f"{sw['upgrade'][0]} to {sw['upgrade'][1]}, by session) and once back (at {sw['rollback'][0]} to "
      f"{sw['rollback'][1]}); {r['quiet_sessions']} idle sessions kept their memory; step counters continue")
for f in r["per_replica"]:
    print(f"upgrade: replica {f['url']}: load {f['load_s']} s; activate {f['upgrade_migrated']} sessions migrated, "
          f"pause {f['upgrade_pause_ms']} ms; rollback {f['rollback_migrated']} migrated, pause {f['rollback_pause_ms']} ms")
PY

step "scale-out: Prometheus (profile monitoring) holds every replica's series"
# Each replica's address on the compose network, as Prometheus finds it by DNS (its `instance` label), and
# its own trmrl_steps_total (no traffic now): Prometheus must come to hold the same value for each.
INSTANCES=()
for id in "${REPLICAS[@]}"; do
    p=$(docker port "$id" 8000/tcp | head -1 | sed 's/.*://')
    ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id")
    INSTANCES+=("--instance=$ip:8000=$(metric "http://127.0.0.1:$p" trmrl_steps_total)")
done
PURL="http://127.0.0.1:$PROMETHEUS_PORT"
timed "scale: prometheus holds every replica's series" to_file "$LOGS/prometheus.txt" \
    "$PY" docker/smoke_checks.py prometheus "$PURL" "${INSTANCES[@]}" --timeout 120 ||
    fail "Prometheus does not hold every replica's series"

step "scale-out: kill one replica, the clients recover"
timed "scale: sessions across a killed replica" to_file "$LOGS/kill.json" "$PY" docker/smoke_driver.py --url "$RURL" --api-key "$KEY" \
    --sessions 12 --steps 10 --snapshot-half --min-upstreams 2 --expect recover --ready-url "$RURL/readyz" \
    --disrupt "docker kill ${REPLICAS[0]} >/dev/null"
timed "scale: trmrl-sim with one replica left (http)" sim "$RURL" http scale-after-kill
# The killed replica leaves the service's DNS records: fewer targets than TRMRL_REPLICAS=2.
timed "scale: prometheus alert for the killed replica" "$PY" docker/smoke_checks.py alert "$PURL" TrmrlReplicasMissing \
    --timeout 90 || fail "Prometheus raised no TrmrlReplicasMissing after a replica was killed"
timed "scale: compose down -v" "${COMPOSE[@]}" "${SCALED[@]}" down -v --remove-orphans

step "summary"
printf '%s\n' "${TIMINGS[@]}"
echo
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^trmrl/' | sort
