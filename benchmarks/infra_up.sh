#!/usr/bin/env bash
# The deployment of infra/ brought up for real, as a user would, then torn down:
#
#   images  the retrain image (infra/Dockerfile) on a Python + PyTorch base, and stand-ins for
#           the registry images (PostgreSQL, Prefect, MinIO -> moto), built from a Debian
#           bookworm base made with debootstrap (no container registry is needed)
#   up      infra/compose.yaml + infra/compose.test.yaml: Prefect server on PostgreSQL, the S3
#           store, a Dask scheduler and 2 workers, the CPU worker, the "gpu" pool's worker on
#           the CPU, and the one-shot `retrain deploy`
#   secure  as a user sets it up (infra/README.md): passwords and the Prefect API's auth string
#           made afresh (never written to the repository), the Dask certificates made by
#           infra/make-certs.sh; published ports on 127.0.0.1 (compose.ports.yaml adds MinIO
#           and the TLS scheduler for the checks from this host)
#   run     MerchData and the SqueezeNet weights put in the bucket; the scheduled retraining
#           deployment started now; its model promoted in the bucket; the score deployment run
#           on a folder of the bucket through the Dask service (tls://); the API without the
#           auth string and the scheduler without a certificate of the cluster's CA refused
#   down    everything removed (containers, volumes); the engine stopped if this script started it
#
# Prints the time of each step and the images' sizes. Exit 0: all of it worked; 77: no
# container engine can run here, or ../shared is missing (nothing was tried); else failed.
#
#   bash benchmarks/infra_up.sh               # as root where dockerd is not running yet
#
# Settings: infra/test.env (ports on the host network, data URLs); a variable set in the
# environment wins. The secrets are made here, in a folder removed at the end. PYTHON (default .venv/bin/python) runs the checks from the host.
# INFRA_KEEP_IMAGES=0 removes the images at the end too (the next run builds from nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SHARED=${SHARED:-$ROOT/../shared}
MERCH_ZIP=${MERCH_ZIP:-$SHARED/data/MerchData.zip}
WEIGHTS=${WEIGHTS:-$SHARED/weights/squeezenet1_1_caffe-2c890718.pth}
WORK=$(mktemp -d /tmp/retrain-infra-up.XXXXXX)
skip() { echo "SKIP: $*" >&2; exit 77; }

# infra/test.env, under what the environment already sets
while IFS='=' read -r key value; do
  [[ $key =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
  [[ -n ${!key+x} ]] || export "$key=$value"
done < infra/test.env
[[ -f $MERCH_ZIP && -f $WEIGHTS ]] || skip "$MERCH_ZIP or $WEIGHTS is missing"
[[ -x $PYTHON ]] || skip "no $PYTHON (set PYTHON to a Python with retrain's test extras)"

# the secrets a user sets in infra/.env, made afresh; the Dask certificates by the documented step
secret() { "$PYTHON" -c 'import secrets; print(secrets.token_hex(24))'; }
[[ -n ${POSTGRES_PASSWORD:-} ]] || POSTGRES_PASSWORD=$(secret)
[[ -n ${MINIO_ROOT_PASSWORD:-} ]] || MINIO_ROOT_PASSWORD=$(secret)
[[ -n ${PREFECT_API_AUTH_STRING:-} ]] || PREFECT_API_AUTH_STRING="admin:$(secret)"
export POSTGRES_PASSWORD MINIO_ROOT_PASSWORD PREFECT_API_AUTH_STRING
export RETRAIN_DASK_CERTS=$WORK/certs
bash infra/make-certs.sh "$RETRAIN_DASK_CERTS" >/dev/null
# this host's checks are a Dask client like the CPU worker: the client's key, the cluster's CA
export DASK_DISTRIBUTED__COMM__TLS__CA_FILE=$RETRAIN_DASK_CERTS/ca.crt \
       DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT=$RETRAIN_DASK_CERTS/client.crt \
       DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY=$RETRAIN_DASK_CERTS/client.key

export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export AWS_ENDPOINT_URL="http://127.0.0.1:$MINIO_PORT" AWS_ACCESS_KEY_ID=$MINIO_ROOT_USER \
       AWS_SECRET_ACCESS_KEY=$MINIO_ROOT_PASSWORD AWS_DEFAULT_REGION=us-east-1
unset PREFECT_PROFILE
export PREFECT_HOME=$WORK/prefect-home

# ---- timings -----------------------------------------------------------------------------------
declare -a TIMES=()
step() {  # step NAME COMMAND...: run it, record its seconds
  local name=$1 start=$SECONDS
  shift
  echo "== $name" >&2
  "$@"
  TIMES+=("$(printf '%-34s %5d s' "$name" $((SECONDS - start)))")
}

# ---- the engine --------------------------------------------------------------------------------
STARTED_DOCKERD=""
start_engine() {
  command -v docker >/dev/null || skip "no docker client"
  docker info >/dev/null 2>&1 && return 0
  command -v dockerd >/dev/null && [[ $(id -u) = 0 ]] || skip "no running engine, and no dockerd to start as root"
  # no bridge, no iptables: containers use the host's network (what compose.test.yaml asks for)
  dockerd --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 0.5; done
  tail -20 "$WORK/dockerd.log" >&2
  skip "dockerd did not start"
}

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
compose() {
  "${COMPOSE[@]}" --project-directory infra -f infra/compose.yaml -f infra/compose.ports.yaml \
    -f infra/compose.test.yaml --env-file infra/test.env "$@"
}

INDEX_PID=""
teardown() {
  local rc=$?
  trap - EXIT
  if docker info >/dev/null 2>&1; then
    # what the services said, where a step failed (the flow runs' output is the workers')
    [[ $rc = 0 ]] || compose logs --no-color --tail 60 worker-cpu worker-gpu-on-cpu deploy dask-worker >&2 || true
    local start=$SECONDS
    compose down --volumes --remove-orphans --timeout 10 >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
    TIMES+=("$(printf '%-34s %5d s' "teardown (compose down -v)" $((SECONDS - start)))")
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
    [[ -z $left ]] || { echo "containers left after down: $left" >&2; rc=1; }
    if [[ ${INFRA_KEEP_IMAGES:-1} = 0 ]]; then
      docker image rm -f "$RETRAIN_IMAGE" retrain-test/{torch,postgres,s3,prefect} retrain-test/debian:bookworm \
        >/dev/null 2>&1 || true
      docker image prune -f >/dev/null
    fi
  fi
  [[ -z $INDEX_PID ]] || kill "$INDEX_PID" 2>/dev/null || true
  if [[ -n $STARTED_DOCKERD ]]; then kill "$STARTED_DOCKERD"; wait "$STARTED_DOCKERD" 2>/dev/null || true; fi
  printf '%s\n' "${TIMES[@]}"
  rm -rf "$WORK"
  exit "$rc"
}

# ---- images --------------------------------------------------------------------------------------
debian_base() {  # retrain-test/debian:bookworm from Debian's package mirror
  docker image inspect retrain-test/debian:bookworm >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || skip "no debootstrap to make a Debian base image (apt-get install debootstrap)"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -c . | docker import - retrain-test/debian:bookworm >/dev/null
  rm -rf "$WORK/rootfs"
}

torch_source() {  # TORCH_REQUIREMENTS / TORCH_PIP_ARGS for the base image
  # the torch and torchvision of the project's environment (a pair that works together)
  TORCH_REQUIREMENTS=$("$PYTHON" -c 'import torch, torchvision as tv; v = lambda m: m.__version__.split("+")[0]
print(f"torch=={v(torch)} torchvision=={v(tv)}")')
  TORCH_PIP_ARGS=""
  # a local package index of pip's (file://.../simple with torch in it), served to the
  # build's containers over the host network so the wheels are not downloaded again
  local url dir port
  for url in ${PIP_EXTRA_INDEX_URL:-$(pip config get global.extra-index-url 2>/dev/null || true)}; do
    dir=${url#file://}
    [[ $url == file://* && -d $dir/torch ]] || continue
    # a fixed port: the URL is a build argument, part of the build cache's key
    port=$RETRAIN_TEST_INDEX_PORT
    "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$(dirname "$dir")" >"$WORK/index.log" 2>&1 &
    INDEX_PID=$!
    TORCH_PIP_ARGS="--extra-index-url http://127.0.0.1:$port/$(basename "$dir")"
    return 0
  done
}

build_images() {
  cp "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" infra/test/ca.crt
  torch_source
  local target
  for target in postgres s3 prefect torch; do
    docker build --network host -f infra/test/images.Dockerfile --target "$target" -t "retrain-test/$target" \
      --build-arg "TORCH_PIP_ARGS=$TORCH_PIP_ARGS" --build-arg "TORCH_REQUIREMENTS=$TORCH_REQUIREMENTS" \
      infra/test >"$WORK/build-$target.log" 2>&1 || { tail -30 "$WORK/build-$target.log" >&2; return 1; }
  done
  [[ -z $INDEX_PID ]] || { kill "$INDEX_PID"; INDEX_PID=""; }
  # one service builds the retrain image that all of them run
  compose build deploy >"$WORK/build-retrain.log" 2>&1 || { tail -30 "$WORK/build-retrain.log" >&2; return 1; }
}

# ---- the stack -----------------------------------------------------------------------------------
check_ports_free() {
  local port
  for port in "$PREFECT_PORT" "$POSTGRES_PORT" "$MINIO_PORT" "$MINIO_CONSOLE_PORT" "$DASK_SCHEDULER_PORT" \
    "$DASK_DASHBOARD_PORT"; do
    "$PYTHON" -c "import socket, sys; s = socket.socket(); s.bind(('0.0.0.0', $port))" 2>/dev/null \
      || { echo "port $port is taken on this host: change it in infra/test.env" >&2; return 2; }
  done
}

up() {
  compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; compose logs --tail 40 >&2; return 1; }
  local deploy_rc
  deploy_rc=$(docker wait "$(compose ps -q deploy)")
  [[ $deploy_rc = 0 ]] || { compose logs deploy >&2; return 1; }
}

check() { "$PYTHON" benchmarks/infra_check.py "$@" | tee -a "$WORK/checks.jsonl"; }

published_on_localhost() {  # every port the stack publishes is bound to 127.0.0.1
  local ports
  ports=$(docker ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --format '{{.Names}} {{.Ports}}')
  echo "$ports" >&2
  if grep -E -- '(0\.0\.0\.0|\[?::\]?):[0-9]+->' <<<"$ports"; then
    echo "a port is published beyond 127.0.0.1" >&2
    return 1
  fi
}

start_engine
trap teardown EXIT
check_ports_free
step "debian base (debootstrap + import)" debian_base
step "images (stand-ins, base, retrain)" build_images
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^(retrain-test|retrain)' | sort
step "up (healthy) + retrain deploy" up
step "ports published on 127.0.0.1 only" published_on_localhost
step "refused without credentials" check refused "tls://127.0.0.1:$DASK_SCHEDULER_PORT"
step "data into the bucket" check upload "$MERCH_ZIP" "$WEIGHTS"
step "retrain/scheduled (train on gpu pool)" check run retrain/scheduled
step "promotion in the bucket" check promoted MerchData
RUN_ID=$(tail -1 "$WORK/checks.jsonl" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["run_id"])')
step "score/batch on the Dask service" check run score/batch "model=$RUN_ID" "images=s3://$RETRAIN_BUCKET/new"
step "scores in the bucket" check scores "s3://$RETRAIN_BUCKET/new"
step "dask scheduler ran the partitions" check dask "tls://127.0.0.1:$DASK_SCHEDULER_PORT"
echo "ALL STEPS PASSED"
