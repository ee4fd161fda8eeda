#!/usr/bin/env bash
# Install llama-cpp-python VERSION into the virtual environment VENV (whose python is PY), built
# from its PyPI sdist with portable CPU flags: the default native build (GGML_NATIVE) picks
# instruction paths (AMX) that crash at the first inference on some virtual machines. The
# build takes minutes, so the wheel is kept in LLAMA_CPP_CACHE (default
# ~/.cache/shortened/llama-cpp-python), keyed by version and flags: a new venv (a fresh clone,
# CI) installs it in seconds. llama.cpp's HF -> GGUF converter, which ships only in llama.cpp's
# source tree, is extracted from the same sdist into VENV/share/llama.cpp (with its gguf-py,
# conversion package, licence and a VERSION file).
#
#   scripts/install-llama-cpp.sh .venv/bin/python 0.3.36 .venv
set -euo pipefail
PY=$1
VERSION=$2
VENV=$3
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON"
FLAGS="$FLAGS -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF"
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/shortened/llama-cpp-python}
key=$(printf '%s %s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-12)
dir=$CACHE/$VERSION-$key
sdist=$dir/llama_cpp_python-$VERSION.tar.gz

mkdir -p "$dir"
if [ ! -f "$sdist" ]; then
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$dir"
fi
wheel=$(find "$dir" -maxdepth 1 -name "llama_cpp_python-$VERSION-*.whl" | head -n 1)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION with portable CPU flags (once; minutes)"
  start=$(date +%s)
  rm -rf "$dir/build"
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$dir/build" "$sdist"
  mv "$dir"/build/llama_cpp_python-"$VERSION"-*.whl "$dir/"
  rm -rf "$dir/build"
  wheel=$(find "$dir" -maxdepth 1 -name "llama_cpp_python-$VERSION-*.whl" | head -n 1)
  echo "built llama-cpp-python $VERSION in $(( $(date +%s) - start )) s"
fi
"$PY" -m pip install -q --force-reinstall --no-deps "$wheel"
"$PY" -m pip install -q "$wheel"  # its dependencies (numpy, jinja2, diskcache)

converter=$VENV/share/llama.cpp
rm -rf "$converter"
mkdir -p "$converter"
vendored=llama_cpp_python-$VERSION/vendor/llama.cpp
tar -xzf "$sdist" -C "$converter" --strip-components=3 \
  "$vendored/convert_hf_to_gguf.py" "$vendored/conversion" "$vendored/gguf-py" "$vendored/LICENSE"
echo "$VERSION" > "$converter/VERSION"
