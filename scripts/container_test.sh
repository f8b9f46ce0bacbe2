#!/usr/bin/env bash
# Container test (make container-test): build the imgcls serving image from the real Dockerfile with buildah,
# run `imgcls serve` inside it on loopback with an exported model, Predict from outside, check gRPC health,
# the image's HEALTHCHECK and /metrics, stop it with SIGTERM (drain, exit 0), then again with TLS and a bearer
# token (gRPC and HTTPS; wrong token and plaintext refused), clean up. Prints each step's time.
#
# No Docker engine and no container registry is needed: when no registry base is reachable (these machines),
# a Debian bookworm base with Python 3.11 is debootstrapped once, imported with podman, and cached
# (the image in containers storage, the rootfs tarball under $IMGCLS_CONTAINER_CACHE).
#
# Needs root, buildah, podman, debootstrap (apt-get install buildah podman debootstrap) and the project's
# .venv (the host side trains/exports the tiny model and is the gRPC client).
#
# Environment:
#   IMGCLS_BASE_IMAGE           base image to build on (skips the registry try and debootstrap)
#   IMGCLS_CONTAINER_TEST_REPO  an existing model repository to serve (skips training a tiny model)
#   IMGCLS_CONTAINER_TEST_TRAINER=1  also build the `trainer` target (TensorFlow: ~2.7 GB, minutes cold) and
#                               train + export the tiny model inside it instead of on the host
#   IMGCLS_CONTAINER_CACHE      cache folder (default /var/tmp/imgcls-container)
#   IMGCLS_IMAGE                tag of the image built (default localhost/imgcls:container-test)
#   IMGCLS_BUILD_CA             CA bundle given to pip inside the build as the `pip_ca` secret
#                               (default /etc/ssl/certs/ca-certificates.crt; never stored in the image)
#   IMGCLS_DEBIAN_MIRROR        Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   IMGCLS_CONTAINER_CLEAN=1    also remove the built image at the end (the base and the layer cache stay;
#                               `buildah rmi --prune` drops the layer cache)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${IMGCLS_CONTAINER_CACHE:-/var/tmp/imgcls-container}
IMAGE=${IMGCLS_IMAGE:-localhost/imgcls:container-test}
TRAINER_IMAGE=${IMGCLS_TRAINER_IMAGE:-localhost/imgcls-trainer:container-test}
BUILD_CA=${IMGCLS_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
MIRROR=${IMGCLS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bump the suffix when the recipe below changes, so a cached base is not reused.
LOCAL_BASE=localhost/imgcls-base:bookworm-py311-v1
REGISTRY_BASE=docker.io/library/python:3.11-slim-bookworm
PY=${PYTHON:-$ROOT/.venv/bin/python}
IMGCLS=$(dirname "$PY")/imgcls

log() { echo "[container-test] $*"; }
die() { echo "[container-test] FAILED: $*" >&2; exit 1; }

declare -a TIMES=()
T0=$(date +%s.%N)
step_start() { STEP_NAME=$1; STEP_T=$(date +%s.%N); log "== $1"; }
step_end() {
  local dt; dt=$(awk -v a="$STEP_T" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  TIMES+=("$(printf '%-28s %7s s' "$STEP_NAME" "$dt")"); log "   $STEP_NAME: ${dt} s${1:+ ($1)}"
}

[ "$(id -u)" = 0 ] || die "needs root (buildah --isolation chroot and debootstrap)"
for tool in buildah podman debootstrap; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install buildah podman debootstrap"
done
[ -x "$PY" ] || die "no project venv at $PY: run make install"
mkdir -p "$CACHE"
# One run at a time per cache (shared machines): the base, the model cache and the image tag are shared.
exec 9>"$CACHE/lock"
flock -w 1800 9 || die "another container test still holds $CACHE/lock after 30 min"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/imgcls-ct.XXXXXX")
CTR="" TCTR="" SERVER_PID=""

cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill_server_tree KILL; wait "$SERVER_PID" 2>/dev/null || true
  fi
  [ -n "$CTR" ] && buildah rm "$CTR" >/dev/null 2>&1 || true
  [ -n "$TCTR" ] && buildah rm "$TCTR" >/dev/null 2>&1 || true
  if [ "${IMGCLS_CONTAINER_CLEAN:-0}" = 1 ]; then
    buildah rmi -f "$IMAGE" "$TRAINER_IMAGE" >/dev/null 2>&1 || true
  fi
  if [ $rc -ne 0 ] && [ -f "$WORK/server.log" ]; then
    echo "---- server log (last 40 lines) ----" >&2; tail -n 40 "$WORK/server.log" >&2
  fi
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

# The server process under the `buildah run` we started: buildah answers SIGTERM by SIGKILLing its child,
# so the signal goes to the server itself (argv `.../python3 .../imgcls serve`, not the buildah-chroot-* helpers).
descendants() {
  local pid
  for pid in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$pid"; descendants "$pid"; done
}
kill_server_tree() {  # SIGNAL: signal the server process (not buildah itself)
  local pid
  for pid in $(descendants "$SERVER_PID"); do
    if tr '\0' ' ' < /proc/"$pid"/cmdline 2>/dev/null | grep -Eq '^[^ ]*python[0-9.]* [^ ]*/imgcls serve'; then
      kill -s "$1" "$pid" 2>/dev/null || true
    fi
  done
}

# ---------------------------------------------------------------------------------------------------
step_start "base image"
how=""
if [ -n "${IMGCLS_BASE_IMAGE:-}" ]; then
  BASE=$IMGCLS_BASE_IMAGE; how="given"
  buildah inspect --type image "$BASE" >/dev/null 2>&1 || buildah pull -q "$BASE" >/dev/null
elif buildah inspect --type image "$REGISTRY_BASE" >/dev/null 2>&1 \
    || timeout 120 buildah pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
  BASE=$REGISTRY_BASE; how="registry"
elif buildah inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
  BASE=$LOCAL_BASE; how="cached local base"
else
  BASE=$LOCAL_BASE
  tarball="$CACHE/${LOCAL_BASE##*:}.tar"
  if [ ! -s "$tarball" ]; then
    log "no registry reachable: debootstrap bookworm with Python 3.11 from $MIRROR (about a minute)"
    rootfs="$CACHE/rootfs.partial"; rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$MIRROR" \
      > "$CACHE/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
      "$rootfs"/usr/share/man/* "$rootfs"/tmp/* "$rootfs"/var/log/*.log
    : > "$rootfs"/etc/resolv.conf
    tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
    rm -rf "$rootfs"
    how="debootstrapped"
  else
    how="cached rootfs tarball"
  fi
  podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$tarball" "$LOCAL_BASE" >/dev/null
fi
step_end "$how: $BASE"

# ---------------------------------------------------------------------------------------------------
step_start "image build"
[ -s "$BUILD_CA" ] || die "CA bundle $BUILD_CA missing (IMGCLS_BUILD_CA)"
# The host's pip index settings, passed through when set (the default index needs none).
index=$("$PY" -m pip config get global.index-url 2>/dev/null || true)
build_args=(--build-arg "BASE_IMAGE=$BASE")
[ -n "${PIP_INDEX_URL:-$index}" ] && build_args+=(--build-arg "PIP_INDEX=${PIP_INDEX_URL:-$index}")
buildah bud --isolation chroot --layers --format docker --target serve \
  "${build_args[@]}" --secret "id=pip_ca,src=$BUILD_CA" \
  -t "$IMAGE" -f Dockerfile . > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; die "buildah bud"; }
size=$(podman image inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null | awk '{ printf "%d MB", $1 / 1e6 }')
step_end "$IMAGE, $size"

# ---------------------------------------------------------------------------------------------------
step_start "image checks"
CTR=$(buildah from --pull-never --name "imgcls-ct-$$" "$IMAGE")
buildah inspect --type image "$IMAGE" > "$WORK/image.json"
inspect() {  # inspect KEY...: a field of the image's Docker config, as JSON
  "$PY" -c "import json, sys; c = json.load(open(sys.argv[1]))['Docker']['config']
for k in sys.argv[2:]: c = (c or {}).get(k)
print(c if isinstance(c, str) else json.dumps(c, separators=(',', ':')))" "$WORK/image.json" "$@"
}
user=$(inspect User)
[ "$user" = "10001:10001" ] || die "image user is '$user', expected 10001:10001"
[ "$(buildah run --isolation chroot "$CTR" -- id -u)" = 10001 ] || die "container does not run as uid 10001"
buildah run --isolation chroot "$CTR" -- python3 -c "
import importlib.util as u, shutil, sys
bad = [m for m in ('tensorflow', 'tf_keras', 'tf2onnx') if u.find_spec(m)]
cc = [c for c in ('gcc', 'cc', 'g++', 'clang') if shutil.which(c)]
import onnxruntime, ai_edge_litert, imgcls.service.server  # the serving stack imports
sys.exit(f'runtime image has {bad} {cc}' if bad or cc else 0)" || die "runtime image content"
entrypoint=$(inspect Entrypoint)
[ "$entrypoint" = '["imgcls","serve"]' ] || die "entrypoint is $entrypoint"
exposed=$(inspect ExposedPorts)
[[ $exposed == *50051/tcp* && $exposed == *8000/tcp* ]] || die "exposed ports $exposed"
step_end "uid 10001, no TensorFlow, no compiler, ENTRYPOINT imgcls serve, EXPOSE 50051 8000"

# ---------------------------------------------------------------------------------------------------
step_start "model"
if [ "${IMGCLS_CONTAINER_TEST_TRAINER:-0}" = 1 ]; then
  STEP_NAME="trainer image build"
  # The image of the train/export CronJob (Dockerfile target `trainer`): train and export the tiny model
  # inside it, as its non-root user, into a folder that the serving container then mounts.
  buildah bud --isolation chroot --layers --format docker --target trainer \
    "${build_args[@]}" --secret "id=pip_ca,src=$BUILD_CA" -t "$TRAINER_IMAGE" -f Dockerfile . \
    > "$WORK/build-trainer.log" 2>&1 || { tail -n 40 "$WORK/build-trainer.log" >&2; die "buildah bud --target trainer"; }
  step_end "trainer image built: $TRAINER_IMAGE"
  step_start "model (trainer image)"
  REPO="$WORK/repo"; mkdir -p "$WORK/data" "$WORK/scratch" "$REPO"
  PYTHONPATH=tests "$PY" -c "from pathlib import Path; from helpers import make_dataset; \
make_dataset(Path('$WORK/data/photos'), classes=3, per_class=24)"
  chmod -R a+rX "$WORK/data"; chown 10001:10001 "$WORK/scratch" "$REPO"
  TCTR=$(buildah from --pull-never --name "imgcls-ct-trainer-$$" "$TRAINER_IMAGE")
  trainer_run() {
    buildah run --isolation chroot -v "$WORK/data:/data:ro" -v "$WORK/scratch:/work" -v "$REPO:/models" \
      --env TF_CPP_MIN_LOG_LEVEL=2 "$TCTR" -- imgcls "$@" >> "$WORK/trainer.log" 2>&1 \
      || { tail -n 30 "$WORK/trainer.log" >&2; die "imgcls $1 in the trainer image"; }
  }
  trainer_run train --data /data/photos --out /work/bundle --backbone vgg16 --weights none --input-size 32 \
    --epochs 10 --learning-rate 0.01 --seed 1 --json
  trainer_run export --model /work/bundle --repository /models --name tiny --formats onnx tflite --no-benchmark --json
  buildah rm "$TCTR" >/dev/null; TCTR=""
  how="trained + exported in $TRAINER_IMAGE as uid 10001"
elif [ -n "${IMGCLS_CONTAINER_TEST_REPO:-}" ]; then
  REPO=$(cd "$IMGCLS_CONTAINER_TEST_REPO" && pwd); how="given: $REPO"
else
  # A tiny model (VGG16, random weights, 32 px, 3 synthetic classes) as the tests make one; cached by the
  # hash of the code that writes and reads it.
  key=$(cat imgcls/manifest.py imgcls/preprocessing.py imgcls/backbones.py training/*.py export/*.py \
    tests/helpers.py | sha256sum | cut -c1-12)
  REPO="$CACHE/model-repo-$key"
  if [ -f "$REPO/tiny/1/manifest.json" ]; then
    how="cached: $REPO"
  else
    rm -rf "$CACHE"/model-repo-* "$CACHE/model-work"; mkdir -p "$CACHE/model-work"  # older keys too
    PYTHONPATH=tests "$PY" -c "from pathlib import Path; from helpers import make_dataset; \
make_dataset(Path('$CACHE/model-work/photos'), classes=3, per_class=24)"
    TF_CPP_MIN_LOG_LEVEL=2 "$IMGCLS" train --data "$CACHE/model-work/photos" --out "$CACHE/model-work/bundle" \
      --backbone vgg16 --weights none --input-size 32 --epochs 10 --learning-rate 0.01 --seed 1 --json \
      > "$CACHE/model-work/train.log" 2>&1 || { tail -n 20 "$CACHE/model-work/train.log" >&2; die "train"; }
    TF_CPP_MIN_LOG_LEVEL=2 "$IMGCLS" export --model "$CACHE/model-work/bundle" --repository "$REPO.partial" \
      --name tiny --formats onnx tflite --no-benchmark --json \
      > "$CACHE/model-work/export.log" 2>&1 || { tail -n 20 "$CACHE/model-work/export.log" >&2; die "export"; }
    mv "$REPO.partial" "$REPO"
    rm -rf "$CACHE/model-work"
    how="trained + exported: $REPO"
  fi
fi
chmod -R a+rX "$REPO"  # the container user (uid 10001) reads it through the mount
step_end "$how"

# ---------------------------------------------------------------------------------------------------
step_start "server start"
read -r PORT METRICS_PORT < <("$PY" -c "
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*[s.getsockname()[1] for s in socks])")
# The image's own ENTRYPOINT, run as the image's user; buildah's chroot isolation shares the host network.
mapfile -t cmd < <("$PY" -c "import json, sys; print(*json.loads(sys.argv[1]), sep='\n')" "$entrypoint")
buildah run --isolation chroot -v "$REPO:/models:ro" \
  --env IMGCLS_HOST=127.0.0.1 --env "IMGCLS_PORT=$PORT" --env "IMGCLS_METRICS_PORT=$METRICS_PORT" \
  --env IMGCLS_GRACE_PERIOD=10 \
  "$CTR" -- "${cmd[@]}" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
"$PY" - "$PORT" "$SERVER_PID" <<'EOF' || die "server did not become SERVING"
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
port, pid = sys.argv[1], int(sys.argv[2])
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
deadline, status = time.monotonic() + 180, None
while time.monotonic() < deadline:
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("server exited")
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(service="imgcls.v1.Inference"), timeout=2).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            sys.exit(0)
    except grpc.RpcError:
        pass
    time.sleep(0.3)
sys.exit(f"health still {status} after 180 s")
EOF
step_end "SERVING on 127.0.0.1:$PORT, metrics :$METRICS_PORT"

# ---------------------------------------------------------------------------------------------------
step_start "predict + health + metrics"
"$PY" -c "from PIL import Image; Image.new('RGB', (40, 40), (220, 40, 40)).save('$WORK/red.jpg'); \
open('$WORK/not-an-image.jpg', 'wb').write(b'not an image')"
"$IMGCLS" predict --target "127.0.0.1:$PORT" --top-k 2 --json "$WORK/red.jpg" "$WORK/not-an-image.jpg" \
  > "$WORK/predict.jsonl" || true  # exits 1 because one file is not an image: checked below
"$PY" - "$WORK/predict.jsonl" <<'EOF' || die "predict output"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
assert len(records) == 2, records
ok, bad = records
assert ok["model"] == "tiny" and ok["version"] >= 1 and len(ok["labels"]) == 2, ok
assert ok["labels"][0]["name"].startswith("class_") and 0 < ok["labels"][0]["score"] <= 1, ok
assert bad["error"]["code"] == "INVALID_ARGUMENT", bad
print(f"[container-test]    predict: {ok['labels'][0]['name']} {ok['labels'][0]['score']:.3f} (v{ok['version']}); "
      f"bad image -> {bad['error']['code']}")
EOF
hc=$(inspect Healthcheck Test)
mapfile -t hc_cmd < <("$PY" -c "import json, sys; t = json.loads(sys.argv[1]); assert t[0] == 'CMD', t; \
print(*t[1:], sep='\n')" "$hc")
buildah run --isolation chroot --env "IMGCLS_PORT=$PORT" "$CTR" -- "${hc_cmd[@]}" \
  || die "the image's HEALTHCHECK failed against the running server"
"$PY" - "$METRICS_PORT" <<'EOF' || die "metrics"
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
def value(name, **labels):
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert found, f"no sample {name}{labels} in /metrics"
    return sum(found)
assert value("imgcls_model_loaded", model="tiny", runtime="tflite") == 1  # default order: tflite > onnx
assert value("imgcls_requests_total", method="Predict", model="tiny", code="OK") >= 1
assert value("imgcls_images_total", model="tiny", code="OK") == 1
assert value("imgcls_images_total", model="tiny", code="INVALID_ARGUMENT") == 1
assert value("imgcls_batch_size_count", model="tiny") >= 1
assert value("imgcls_request_duration_seconds_count", method="Predict", model="tiny") >= 1
print("[container-test]    metrics: imgcls_model_loaded 1 (tflite), imgcls_requests_total, imgcls_images_total "
      "(1 OK, 1 INVALID_ARGUMENT), imgcls_batch_size, imgcls_request_duration_seconds")
EOF
step_end "Predict from the host, grpc.health.v1 SERVING, HEALTHCHECK ok, /metrics"

# ---------------------------------------------------------------------------------------------------
step_start "SIGTERM drain"
kill_server_tree TERM
rc=0; timeout 60 tail --pid="$SERVER_PID" -f /dev/null || true
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[ "$rc" = 0 ] || die "server exited $rc after SIGTERM (expected 0)"
grep -q "draining" "$WORK/server.log" || die "no drain in the server log"
# What the server wrote into the container's filesystem (Kubernetes runs it read-only, /tmp an emptyDir).
mnt=$(buildah mount "$CTR")
written=$(find "$mnt" -xdev -uid 10001 -printf '/%P\n' | head -n 20)
buildah umount "$CTR" >/dev/null
[ -z "$(grep -v '^/tmp/' <<<"$written")" ] || die "the server wrote outside /tmp: $written"
step_end "drained, exit 0; files written: ${written:-none}"

# ---------------------------------------------------------------------------------------------------
# TLS and a bearer token (docs/security.md): certificates made on the host, mounted like a Kubernetes Secret,
# the settings through the image's IMGCLS_* variables; the host's `imgcls predict` is the client.
step_start "TLS + bearer token"
TLS="$WORK/tls"
"$PY" "$ROOT/tests/tls_certs.py" "$TLS" || die "making test certificates (cryptography, the dev extra)"
"$PY" -c "import secrets; print(secrets.token_hex(20))" > "$TLS/tokens"
chown -R 10001:10001 "$TLS"; chmod 0600 "$TLS"/*.key "$TLS/tokens"  # the server's user only, as a Secret
read -r TPORT THTTP < <("$PY" -c "
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*[s.getsockname()[1] for s in socks])")
buildah run --isolation chroot -v "$REPO:/models:ro" -v "$TLS:/etc/imgcls/tls:ro" \
  --env IMGCLS_HOST=127.0.0.1 --env "IMGCLS_PORT=$TPORT" --env IMGCLS_METRICS_PORT=0 --env "IMGCLS_HTTP_PORT=$THTTP" \
  --env IMGCLS_GRACE_PERIOD=10 --env IMGCLS_TLS_CERT=/etc/imgcls/tls/server.crt \
  --env IMGCLS_TLS_KEY=/etc/imgcls/tls/server.key --env IMGCLS_TOKEN_FILE=/etc/imgcls/tls/tokens \
  "$CTR" -- "${cmd[@]}" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
"$PY" - "$THTTP" "$SERVER_PID" "$TLS" <<'EOF' || die "TLS server did not become ready"
import json, os, ssl, sys, time, urllib.error, urllib.request
port, pid, tls = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=f"{tls}/ca.crt")
deadline = time.monotonic() + 180
while time.monotonic() < deadline:  # health over HTTPS, without a token (what a Kubernetes probe does)
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("server exited")
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/health/ready", context=context, timeout=2) as r:
            if json.loads(r.read()).get("ready"):
                sys.exit(0)
    except (OSError, urllib.error.URLError):
        pass
    time.sleep(0.3)
sys.exit("not ready after 180 s")
EOF
IMGCLS_TOKEN=$(cat "$TLS/tokens") "$IMGCLS" predict --target "127.0.0.1:$TPORT" --tls-ca "$TLS/ca.crt" --json \
  "$WORK/red.jpg" > "$WORK/tls.jsonl" || die "predict over TLS with the token"
"$PY" -c "import json, sys; r = json.loads(open(sys.argv[1]).readline()); assert r['model'] == 'tiny', r" \
  "$WORK/tls.jsonl" || die "predict over TLS: output"
rc=0; IMGCLS_TOKEN=wrong "$IMGCLS" predict --target "127.0.0.1:$TPORT" --tls-ca "$TLS/ca.crt" "$WORK/red.jpg" \
  > /dev/null 2> "$WORK/refused.txt" || rc=$?
{ [ "$rc" = 2 ] && grep -q UNAUTHENTICATED "$WORK/refused.txt"; } || die "a wrong token: exit $rc (expected 2)"
rc=0; env -u IMGCLS_TOKEN "$IMGCLS" predict --target "127.0.0.1:$TPORT" --timeout 3 "$WORK/red.jpg" \
  > /dev/null 2>&1 || rc=$?
[ "$rc" = 3 ] || die "a plaintext client: exit $rc (expected 3, no TLS handshake)"
"$PY" - "$THTTP" "$TLS" "$WORK/red.jpg" <<'EOF' || die "HTTPS with and without the token"
import ssl, sys, urllib.error, urllib.request
port, tls, image = sys.argv[1:4]
context = ssl.create_default_context(cafile=f"{tls}/ca.crt")
token = open(f"{tls}/tokens").read().strip()
def status(headers):
    request = urllib.request.Request(f"https://127.0.0.1:{port}/predict", data=open(image, "rb").read(),
                                     headers=headers)
    try:
        return urllib.request.urlopen(request, context=context, timeout=30).status
    except urllib.error.HTTPError as exc:
        return exc.code
assert status({"Authorization": f"Bearer {token}"}) == 200
assert status({}) == 401 and status({"Authorization": "Bearer wrong"}) == 401
EOF
kill_server_tree TERM
rc=0; timeout 60 tail --pid="$SERVER_PID" -f /dev/null || true
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[ "$rc" = 0 ] || die "TLS server exited $rc after SIGTERM (expected 0)"
grep -q "requests ports: TLS, bearer tokens" "$WORK/server.log" || die "the server did not say TLS + tokens"
step_end "gRPC and HTTPS with the token; wrong token UNAUTHENTICATED/401, plaintext refused"

buildah rm "$CTR" >/dev/null; CTR=""
total=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
log "timings:"
for line in "${TIMES[@]}"; do log "  $line"; done
log "  $(printf '%-28s %7s s' total "$total")"
log "OK"
