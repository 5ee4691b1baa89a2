#!/usr/bin/env bash
# Assemble a CPU-only libtorch 2.9.0 folder for the `tch` cargo feature (burn-tch 0.22.1 -> tch 0.22 -> torch 2.9.0).
#
# Usage: setup/libtorch-cpu.sh [TARGET_DIR]      (default: .libtorch/ at the repo root)
# Then:  export LIBTORCH=<printed path>; cargo build --release --features tch
#
# PyPI only has CUDA builds of torch on Linux, and pointing LIBTORCH at the raw wheel makes torch-sys
# link libtorch_cuda (which needs the whole CUDA stack). So we take the CPU pieces out of the wheel:
# include/, lib/libtorch_cpu.so, libtorch.so, libc10.so and the bundled libgomp, plus the two CUDA
# runtime libraries that libtorch_cpu.so still has as DT_NEEDED (libcudart.so.12 for its CUDA
# stubs, libcupti.so.12 for the kineto profiler) from their own 12.8.90 wheels.
# Idempotent: a folder with a complete .assembled stamp is left alone.
set -euo pipefail

TORCH_VERSION=2.9.0
CUDA_WHEEL_VERSION=12.8.90
PYTHON=${PYTHON:-python3}

repo_root=$(cd "$(dirname "$0")/.." && pwd)
target=${1:-$repo_root/.libtorch}
mkdir -p "$(dirname "$target")"
target=$(cd "$(dirname "$target")" && pwd)/$(basename "$target")

stamp="$target/.assembled"
want="torch=$TORCH_VERSION cuda-runtime=$CUDA_WHEEL_VERSION"
required=(include/torch/csrc/api/include/torch/torch.h lib/libtorch_cpu.so lib/libtorch.so lib/libc10.so
          lib/libcudart.so.12 lib/libcupti.so.12)
complete() {
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] || return 1
    local f
    for f in "${required[@]}"; do [ -e "$target/$f" ] || return 1; done
}

# Only a folder this script made (stamped) or an empty one may be replaced.
if [ -e "$target" ] && [ ! -f "$stamp" ] && [ -n "$(ls -A "$target" 2>/dev/null)" ]; then
    echo "error: $target exists and is not a libtorch folder made by this script; give another target folder" >&2
    exit 1
fi

# Unpacks the members of a wheel matching the patterns (Python's zipfile: no unzip needed).
extract() {
    "$PYTHON" - "$@" <<'PY'
import fnmatch, sys, zipfile
wheel, dest, *patterns = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not names:
        sys.exit(f"{wheel}: no member matches {patterns}")
    z.extractall(dest, names)
PY
}

if complete; then
    echo "libtorch $TORCH_VERSION (CPU) already assembled in $target" >&2
else
    echo "assembling CPU libtorch $TORCH_VERSION into $target" >&2
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/libtorch-cpu.XXXXXX")
    stage="$target.partial.$$"
    trap 'rm -rf "$tmp" "$stage"' EXIT
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --dest "$tmp/wheels" \
        "torch==$TORCH_VERSION" \
        "nvidia-cuda-runtime-cu12==$CUDA_WHEEL_VERSION" \
        "nvidia-cuda-cupti-cu12==$CUDA_WHEEL_VERSION" >&2
    shopt -s nullglob
    torch_whl=("$tmp"/wheels/torch-"$TORCH_VERSION"-*.whl)
    rt_whl=("$tmp"/wheels/nvidia_cuda_runtime_cu12-*.whl)
    cupti_whl=("$tmp"/wheels/nvidia_cuda_cupti_cu12-*.whl)
    [ ${#torch_whl[@]} -eq 1 ] && [ ${#rt_whl[@]} -eq 1 ] && [ ${#cupti_whl[@]} -eq 1 ] || {
        echo "error: expected one wheel each for torch, nvidia-cuda-runtime-cu12, nvidia-cuda-cupti-cu12 in $tmp/wheels" >&2
        exit 1
    }

    x="$tmp/x"
    extract "${torch_whl[0]}" "$x" 'torch/include/*' 'torch/lib/*'
    extract "${rt_whl[0]}" "$x" '*/libcudart.so.12'
    extract "${cupti_whl[0]}" "$x" '*/libcupti.so.12'

    # Build next to the target and rename into place, so an interrupted run leaves no half folder.
    rm -rf "$stage"
    mkdir -p "$stage/lib"
    mv "$x/torch/include" "$stage/include"
    for lib in libtorch_cpu.so libtorch.so libc10.so; do
        mv "$x/torch/lib/$lib" "$stage/lib/"
    done
    # The wheel bundles its OpenMP runtime (libgomp.so.1 or a hashed libgomp-*.so.1); keep every copy.
    for lib in "$x"/torch/lib/libgomp*; do
        mv "$lib" "$stage/lib/"
    done
    find "$x" -name libcudart.so.12 -exec mv {} "$stage/lib/" \;
    find "$x" -name libcupti.so.12 -exec mv {} "$stage/lib/" \;
    # torch-sys reads build-version and checks it against the torch version tch expects.
    chmod 755 "$stage"/lib/*
    echo "$TORCH_VERSION" > "$stage/build-version"
    echo "$want" > "$stage/.assembled"

    rm -rf "$target"
    mv "$stage" "$target"
    complete || { echo "error: $target is incomplete after assembly" >&2; exit 1; }
    echo "assembled $(du -sh "$target" | cut -f1) in $target" >&2
fi

echo "export LIBTORCH=$target"
