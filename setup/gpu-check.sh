#!/usr/bin/env bash
# The GPU check in one command: on a machine with an NVIDIA GPU, the backend matrix
# (tests/backends.rs: every feature on every backend against cpu) on the GPU backends built
# here (tch-cuda, cuda; each only if built), then `host bench-gpu` (Qwen2-0.5B and
# Llama-3.2-1B shapes, bf16, beside PyTorch eager on the same weights and batch) on each,
# with every log and figure in one folder and a summary.md.
#
# Here, build and stage what the GPU machine runs (see README, "The GPU check"):
#   setup/gpu-check.sh --build cuda      # or tch,cuda (LIBTORCH at a CUDA libtorch 2.9.0)
# It leaves target/gpu-check/{host,backends,features,commit}. On the GPU machine, from the
# repository root, with that folder carried beside the working tree:
#   setup/gpu-check.sh [OUT_DIR]         # default runs/gpu-check-<UTC time>
# Environment: PYTHON (a python whose torch sees the GPU, for bench-gpu's PyTorch side;
# default python3), PREFHOST_GPU_BIN (the staged folder; default target/gpu-check),
# GPU_CHECK_ARCHS (default "qwen2-0.5b llama-1b").
# Exit status: 0 all passed; 1 a check failed; 2 staged files missing or unusable (build
# first); 3 no usable NVIDIA GPU here (everything before that point has run).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
bin=${PREFHOST_GPU_BIN:-$repo/target/gpu-check}

die() {
    local code=$1
    shift
    echo "gpu-check: $*" >&2
    exit "$code"
}

has_feature() { case ",$1," in *",$2,"*) return 0 ;; *) return 1 ;; esac; }

if [ "${1:-}" = "--build" ]; then
    features=${2:-}
    [ -n "$features" ] || die 2 "usage: setup/gpu-check.sh --build FEATURES (cuda, tch or tch,cuda)"
    if has_feature "$features" tch && [ -z "${LIBTORCH:-}" ] && [ -z "${LIBTORCH_USE_PYTORCH:-}" ]; then
        die 2 "--build $features: set LIBTORCH to a CUDA libtorch 2.9.0 (or LIBTORCH_USE_PYTORCH=1 with a CUDA torch 2.9.0) first (README, The GPU check)"
    fi
    if has_feature "$features" cuda; then
        export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
    fi
    cargo build --release --features "$features"
    exe=$(cargo test --release --features "$features" --test backends --no-run --message-format=json \
        | grep -o '"executable":"[^"]*/backends-[^"]*"' | tail -n 1 | cut -d '"' -f 4)
    [ -n "$exe" ] && [ -x "$exe" ] || die 1 "cargo reported no backends test binary"
    rm -rf "$bin"
    mkdir -p "$bin"
    cp target/release/host "$bin/host"
    cp "$exe" "$bin/backends"
    echo "$features" >"$bin/features"
    git rev-parse --short HEAD >"$bin/commit" 2>/dev/null || echo unknown >"$bin/commit"
    echo "staged $bin (features $features): carry it with the working tree; then run setup/gpu-check.sh there"
    exit 0
fi

out=${1:-runs/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
for file in host backends features; do
    [ -e "$bin/$file" ] || die 2 "$bin/$file: missing; build and stage first: setup/gpu-check.sh --build cuda (README, The GPU check)"
done
features=$(cat "$bin/features")
"$bin/host" --version >/dev/null 2>&1 || die 2 "$bin/host does not start here (for tch: LD_LIBRARY_PATH must hold the CUDA libtorch's lib/)"
gpu_backends=()
has_feature "$features" tch && gpu_backends+=(tch-cuda)
has_feature "$features" cuda && gpu_backends+=(cuda)
[ ${#gpu_backends[@]} -gt 0 ] || die 2 "$bin was built with features \"$features\": no GPU backend (tch-cuda or cuda) to check"
has_feature "$features" tch || echo "gpu-check: tch-cuda not built (features \"$features\"): skipped"
has_feature "$features" cuda || echo "gpu-check: cuda not built (features \"$features\"): skipped"
[ -e "$out" ] && die 2 "$out: already exists; give another OUT_DIR"

# Everything above runs anywhere; from here on a GPU is needed.
command -v nvidia-smi >/dev/null 2>&1 ||
    die 3 "no NVIDIA GPU here (nvidia-smi is not on PATH): the backend matrix on ${gpu_backends[*]} and host bench-gpu need one; nothing was run. Run setup/gpu-check.sh on the GPU machine."
gpus=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1) ||
    die 3 "nvidia-smi finds no usable GPU: $gpus"
[ -n "$gpus" ] || die 3 "nvidia-smi lists no GPU"

mkdir -p "$out"
summary="$out/summary.md"
{
    echo "# GPU check"
    echo
    echo "prefhost $(cat "$bin/commit" 2>/dev/null || echo unknown), features $features, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "GPU (name, memory, driver): $gpus"
    echo
} >"$summary"
status=0

echo "gpu-check: backend matrix on ${gpu_backends[*]} (and every other built backend) against cpu"
required=$(IFS=,; echo "${gpu_backends[*]}")
if PREFHOST_TEST_REPO=$repo PREFHOST_TEST_HOST=$bin/host PREFHOST_REQUIRE_BACKENDS=$required \
    "$bin/backends" --nocapture 2>&1 | tee "$out/backends.log"; then
    echo "## Backend matrix: passed" >>"$summary"
else
    status=1
    echo "## Backend matrix: FAILED (backends.log)" >>"$summary"
fi
grep -E "worst|^test .* \.\.\. " "$out/backends.log" | sed 's/^/    /' >>"$summary" || true
echo >>"$summary"

python=${PYTHON:-python3}
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu-check: warning: $python has no torch that sees the GPU; bench-gpu's PyTorch side will be missing" | tee -a "$summary"
fi
for backend in "${gpu_backends[@]}"; do
    for arch in ${GPU_CHECK_ARCHS:-qwen2-0.5b llama-1b}; do
        name="bench-gpu-$backend-$arch"
        echo "gpu-check: host bench-gpu --backend $backend --arch $arch"
        if "$bin/host" bench-gpu --backend "$backend" --arch "$arch" --python "$python" --out "$out/$name" 2>&1 | tee "$out/$name.log"; then
            { echo "## $name"; echo; cat "$out/$name/bench-gpu.md"; echo; } >>"$summary"
        else
            status=1
            echo "## $name: FAILED ($name.log)" >>"$summary"
        fi
    done
done
echo "gpu-check: $( [ $status -eq 0 ] && echo passed || echo FAILED ); figures and logs in $out (summary.md)"
exit $status
