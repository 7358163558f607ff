#!/usr/bin/env bash
# The GPU verification in one command (README, "GPU and IO binding"):
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_PARTS_DIR]
#
# On a machine with an NVIDIA GPU, torch with CUDA, transformers, onnx and onnxscript, and no network: prints the
# providers, runs the gpu-marked tests, exports the deberta-v3-base shape (random weights) in fp32 and fp16 (the
# standard fp16 recipe and the cuda one, in two folders exported side by side), and runs `deberta-onnx bench
# --device cuda` over 1x32, 32x128, 128x128 and 64x512 (half the rows padded): PyTorch eager fp32 and fp16 against
# the runtime in fp32 and fp16, plain, IO binding and CUDA graphs. In about 8 minutes: every step has a time limit.
#
# WHEEL_PARTS_DIR holds the onnxruntime-gpu wheel in parts (part_*, NAME, SHA256, as the project's
# shared/gpu/prepare-ort-gpu.sh splits it): assembled, checked, and installed with this project (no dependencies,
# no network) into a scratch folder put first on PYTHONPATH.
#
# OUT_DIR receives at most 7 files: gpu_check.log (the steps and the providers), tests.log, export-standard.log,
# export-cuda.log, bench.log, and the benchmark's results.json and results.md. Each step logs to its file and the
# script goes on past a failing one. Exit status: 0 when every step passed, 1 when one failed, 2 when this machine
# has no usable GPU (or the wheel parts are wrong): then nothing else runs.
set -u -o pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_PARTS_DIR]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
PARTS=${2:-}
PY=${PYTHON:-python3}
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK=$GPU_CHECK_WORK
else  # a scratch folder for the wheel, the installs and the exported models (several GB), removed at the end
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/deberta-onnx-gpu.XXXXXX") || exit 2
  trap 'rm -rf "$WORK"' EXIT
fi
SITE=${GPU_CHECK_SITE:-$WORK/site}
# Time limits in seconds; the tests and the exports run side by side: 30 + 20 + max(200, 240) + 180 = 470.
LIMIT_INSTALL=${GPU_CHECK_INSTALL_S:-30}
LIMIT_CHECK=${GPU_CHECK_PROVIDERS_S:-20}
LIMIT_TESTS=${GPU_CHECK_TESTS_S:-200}
LIMIT_EXPORT=${GPU_CHECK_EXPORT_S:-240}
LIMIT_BENCH=${GPU_CHECK_BENCH_S:-180}
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT" || exit 2
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S LOGFILE COMMAND...: runs COMMAND under a time limit, its output to LOGFILE; says how it went.
run_step() {
  local name=$1 limit=$2 file=$3 start rc
  shift 3
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$file" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    say "step $name: ok ($(( $(date +%s) - start )) s)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "step $name: TIMED OUT after $limit s (log: $(basename "$file"))"
  else
    say "step $name: FAILED with exit status $rc after $(( $(date +%s) - start )) s (log: $(basename "$file"))"
  fi
  return "$rc"
}

say "deberta-onnx GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), in $ROOT, scratch $WORK"

# 1. The onnxruntime-gpu wheel, from its parts, and this project, into a scratch site folder.
if [ -n "$PARTS" ]; then
  if [ ! -f "$PARTS/NAME" ] || [ ! -f "$PARTS/SHA256" ] || ! ls "$PARTS"/part_* > /dev/null 2>&1; then
    say "error: $PARTS must hold the wheel's parts (part_*) and its NAME and SHA256 files, as prepare-ort-gpu.sh writes them"
    exit 2
  fi
  wheel=$WORK/$(cat "$PARTS/NAME")
  cat "$PARTS"/part_* > "$wheel"
  if ! echo "$(cat "$PARTS/SHA256")  $wheel" | sha256sum -c - >> "$LOG" 2>&1; then
    say "error: the wheel assembled from $PARTS does not match its SHA256 (a part is missing or damaged); copy the parts again"
    exit 2
  fi
  if ! run_step install "$LIMIT_INSTALL" "$LOG" bash -c "
      '$PY' -m pip install -q --no-index --no-deps --target '$SITE' '$wheel' &&
      '$PY' -m pip install -q --no-index --no-deps --no-build-isolation --target '$SITE' '$ROOT'"; then
    say "error: could not install $wheel and this project into $SITE (see above)"
    exit 2
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PY" -c "import deberta_onnx.runtime" > /dev/null 2>&1; then
  run_step install "$LIMIT_INSTALL" "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
    --target "$SITE" "$ROOT" || { say "error: could not install this project into $SITE"; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. The providers; stop here, cleanly, where there is no usable GPU.
command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L >> "$LOG" 2>&1
timeout "$LIMIT_CHECK" "$PY" - >> "$LOG" 2>&1 <<'EOF'
import sys

try:
    import torch  # first: a CUDA build of torch loads the CUDA libraries onnxruntime-gpu needs
except ImportError as exc:
    torch = None
    print(f"torch: not importable ({exc})")
import onnxruntime as ort

if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
providers = ort.get_available_providers()
print(f"onnxruntime {ort.__version__} ({ort.get_device()} build) from {ort.__file__}")
print(f"providers: {', '.join(providers)}")
torch_cuda = torch is not None and torch.cuda.is_available()
if torch is not None:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible to torch: {torch_cuda}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch_cuda else ""))
problems = []
if "CUDAExecutionProvider" not in providers:
    problems.append("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu: pass the wheel's parts "
                    "as the second argument, see the README)")
if not torch_cuda:
    problems.append("torch sees no CUDA device (the PyTorch reference needs a CUDA build of torch and a GPU)")
if problems:
    print("NO USABLE GPU HERE: " + "; ".join(problems))
    sys.exit(2)
EOF
rc=$?
tail -n 4 "$LOG"
if [ "$rc" -ne 0 ]; then
  say "error: no usable GPU on this machine (exit status $rc); nothing else was run. $LOG says why."
  exit 2
fi

# 3. The gpu-marked tests and the two base-shape exports, side by side (the exports use the CPU, the tests the GPU).
failed=0
run_step tests "$LIMIT_TESTS" "$OUT/tests.log" "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider \
  tests/test_iobinding.py tests/test_cuda_graphs.py tests/test_cuda_placement.py &
tests=$!
export_one() {  # export_one RECIPE FOLDER
  run_step "export-$1" "$LIMIT_EXPORT" "$OUT/export-$1.log" "$PY" -m deberta_onnx.runtime.cli export \
    random:deberta-v3-base "$2" --precision fp16 --fp16-recipe "$1" --no-validate --overwrite --quiet
}
export_one standard "$WORK/base" &
standard=$!
export_one cuda "$WORK/base-cuda16" &
cuda=$!
for job in "$tests" "$standard" "$cuda"; do
  wait "$job" || failed=1
done

# 4. The benchmark: PyTorch fp32 and fp16 eager, the runtime's fp32 and both fp16 recipes, every run path.
run_step bench "$LIMIT_BENCH" "$OUT/bench.log" "$PY" -m deberta_onnx.runtime.cli bench \
  "standard=$WORK/base" "cuda16=$WORK/base-cuda16:fp16" --device cuda \
  --shapes 1x32,32x128,128x128,64x512 --corpus-size 0 --warmup 3 --min-time 0.3 --min-calls 3 --max-calls 30 \
  --rounds 2 --no-plot --quiet --out "$OUT" || failed=1

[ -f "$OUT/results.md" ] && say "results: $OUT/results.md, $OUT/results.json"
if [ "$failed" -ne 0 ]; then
  say "done, with failures (see the step lines above)"
  exit 1
fi
say "done: every step passed"
