#!/usr/bin/env bash
# A/B two or more `imgcls serve` builds under perf_analyzer, back to back, on the flower model:
#   bash benchmarks/ab_servers.sh "old|/tmp/base/pkg|" "new||"
# Each argument is "label|PYTHONPATH|extra serve flags"; PYTHONPATH puts another checkout's code first (see
# docs/overload.md for laying out `git archive REV` as a package). The server starts from an empty folder:
# from the repository root, the checkout's imgcls/ would come before PYTHONPATH and run instead. CONC
# (default "1 8 32") and MI (the measurement window in ms, default 4000) tune the run; PROTO=http drives the
# KServe v2 REST endpoint instead of gRPC (perf_analyzer -i http). Needs .venv-peers
# (`make peers-env`) and runs/repo.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export LD_LIBRARY_PATH=$(ls -d .venv-peers/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
input=$(mktemp -d)/input.json
.venv/bin/python - "$input" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import bench_peers
files = sorted((Path.home() / ".keras/datasets/flower_photos").rglob("*.jpg"))[:64]
bench_peers.write_input_data([f.read_bytes() for f in files], "images", Path(sys.argv[1]))
PY
proto=${PROTO:-grpc}
port=50099
[ "$proto" = http ] && port=50097
for spec in "$@"; do
  IFS='|' read -r label pythonpath flags <<< "$spec"
  log=$(mktemp)
  # shellcheck disable=SC2086
  (cd "$(mktemp -d)" && PYTHONPATH=$pythonpath exec "$root/.venv/bin/python" -m imgcls.cli serve --host 127.0.0.1 \
    --port 50099 --metrics-port 0 --http-port 50097 --model-repository "$root/runs/repo" --runtime flowers=onnx $flags) > "$log" 2>&1 &
  pid=$!
  echo "[$label] code: $(cd "$(mktemp -d)" && PYTHONPATH=$pythonpath "$root/.venv/bin/python" -c \
    'import imgcls.service.server as s; print(s.__file__)')"
  for _ in $(seq 120); do grep -q "ready:" "$log" && break; sleep 0.5; done
  for c in ${CONC:-1 8 32}; do
    r=$(.venv-peers/bin/perf_analyzer -m flowers -u "127.0.0.1:$port" -i "$proto" -b 1 --concurrency-range "$c:$c" \
        --input-data "$input" --measurement-interval "${MI:-4000}" 2>&1 | grep -E "Throughput|p50 latency|p99 latency" \
        | tr -s ' \n' ' ' || true)
    echo "[$label] c$c: $r"
  done
  kill -TERM "$pid"; wait "$pid" || true
done
