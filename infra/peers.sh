#!/usr/bin/env bash
# Build llama.cpp's own `llama-server`, the peer that tests/benchmarks/bench_serving_peers.py measures
# Flywheel's chat server against, from the llama.cpp source bundled in PyPI's llama-cpp-python sdist.
# Everything lands under var/peers/ (source, build tree, bin/llama-server); nothing goes into .venv.
#
#   nice -n 19 bash infra/peers.sh > var/peers/build.log 2>&1 &     # ~13 min on 2 cores
#
# Run it in the background and niced, never while someone is measuring: the compile takes both cores.
# A second run with the same version does nothing. JOBS=1 halves the load (and doubles the time).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${FLYWHEEL_PEERS_DIR:-$ROOT/var/peers}"
PY="${PY:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"
BIN="$PEERS/bin/llama-server"

if [[ -x "$BIN" && "$(cat "$PEERS/bin/VERSION" 2>/dev/null)" == "$VERSION" ]]; then
    echo "llama-server from llama-cpp-python $VERSION is already built: $BIN"
    exit 0
fi
mkdir -p "$PEERS/src" "$PEERS/bin"

sdist="$PEERS/src/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    # pip download only fetches the sdist (and prepares its metadata in a throwaway build env).
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$PEERS/src"
fi
src="$PEERS/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f "$src/CMakeLists.txt" ]] || tar -xzf "$sdist" -C "$PEERS/src"

# No network at build time: the web UI would be fetched from a hub (LLAMA_USE_PREBUILT_UI) or built
# with npm (LLAMA_BUILD_UI); the benchmark needs only the HTTP API. GGML_NATIVE compiles for this CPU
# (AVX2 / AVX512 / AMX as it has them), as a user building llama.cpp on the machine would.
cmake -S "$src" -B "$PEERS/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF
cmake --build "$PEERS/build" --target llama-server -j "$JOBS"

cp "$PEERS/build/bin/llama-server" "$BIN"
echo "$VERSION" > "$PEERS/bin/VERSION"
"$BIN" --version 2>&1 | head -3 || true
echo "built $BIN"
