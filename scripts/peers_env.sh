#!/usr/bin/env bash
# Install the benchmark peers (NVIDIA Triton through nvidia-pytriton, perf_analyzer from the tritonclient wheel)
# into their own virtualenv, .venv-peers, so none of them becomes a dependency of the project itself.
# The project goes in without its dependencies (plus the few the core needs), so Triton's model callable
# decodes and preprocesses with the same imgcls.preprocessing code as `imgcls serve`.
# Idempotent: a stamp file records a finished install; delete .venv-peers to redo it.
#
#   bash scripts/peers_env.sh            # or: make peers-env
#   IMGCLS_PEERS_VENV=/tmp/peers bash scripts/peers_env.sh
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${IMGCLS_PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP="$VENV/.peers-stamp"
PACKAGES=(
    "nvidia-pytriton==0.7.0"          # bundles a Triton 2.51 server (CPU works)
    "tritonclient[grpc]==2.51.0"      # its wheel's data folder holds a perf_analyzer binary
    "nvidia-cuda-runtime-cu12"        # libcudart.so.12, which perf_analyzer links against even on CPU
    "onnxruntime>=1.19,<2" "numpy>=1.26,<3" "pillow>=10.3,<13" "pydantic>=2.7,<3"
)

# perf_analyzer links libb64 (Debian package libb64-0d).
if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
    echo "peers-env: installing libb64-0d (apt)"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq libb64-0d >/dev/null; fi
fi

if [ -f "$STAMP" ]; then
    echo "peers-env: $VENV is ready ($(cat "$STAMP"))"
    exit 0
fi

# pip, minus the local index's per-package "is ignored" warnings and setuptools' editable-install banner.
quiet_pip() {
    local rc=0
    "$VENV/bin/pip" install -q "$@" > "$VENV/pip.log" 2>&1 || rc=$?
    grep -v -e "is ignored: it is neither" -e "BuildBackendWarning" -e "^ *!!$" -e "^ *\*\*\*" \
        -e "Please be careful with folders" -e "name as your package" -e "with strategy, WheelFile" \
        -e "^ *$" "$VENV/pip.log" || true
    return "$rc"
}

start=$(date +%s)
echo "peers-env: creating $VENV with $PYTHON"
"$PYTHON" -m venv "$VENV"
quiet_pip --upgrade pip
echo "peers-env: installing ${PACKAGES[*]}"
quiet_pip "${PACKAGES[@]}"
echo "peers-env: installing the project without its dependencies (shared preprocessing)"
quiet_pip --no-deps -e .

perf_analyzer=$("$VENV/bin/python" - <<'EOF'
import sysconfig
from pathlib import Path
print(Path(sysconfig.get_paths()["data"]) / "bin" / "perf_analyzer")
EOF
)
if [ ! -x "$perf_analyzer" ]; then
    echo "peers-env: no perf_analyzer at $perf_analyzer (tritonclient wheel layout changed?)" >&2
    exit 1
fi
echo "peers-env: perf_analyzer at $perf_analyzer"
echo "installed in $(( $(date +%s) - start )) s on $(date -u +%FT%TZ)" > "$STAMP"
echo "peers-env: done, $(cat "$STAMP")"
