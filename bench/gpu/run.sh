#!/usr/bin/env bash
# The whole GPU run in one call (issue 20): bash bench/gpu/run.sh OUT [--dry-run]
#
# Needs .gpu-bundle/ (make gpu-bundle, carried to the machine) and the machine's python3 (torch,
# nvcc, cmake, ninja; no registry).  Writes everything it measured under OUT, in at most 8 files:
#   summary.txt  the figures and a line per step (ok / FAILED / skipped, and why)
#   run.log      everything, in order          env.txt        the machine
#   llama-build.log  exl3-build.log  tests.log  bench.log
# It keeps to its own deadline (GPU_RUN_BUDGET, 530 s) whatever happens: a step that cannot
# finish in the time left is skipped with a line that says so, never the whole run.
#
# Timeline (16 cores): llama-cpp-python's CUDA build (all cores) and exllamav3's JIT extension
# build (nice 19) start together while the models are generated; once llama.cpp is built, the
# exllamav3 build is confined to cores 8-15 and the GGUF steps run on cores 0-7 (P2 pins its
# event loop, decode threads and load generator to cores 0, 1-2 and 3-7); the ExLlamaV3 steps
# run if its build finished in time.
#
# --dry-run (on a CPU machine, with PY set to a Python that stands in for the machine's): every
# step that needs no CUDA, for real (the venv from the bundle, the models, a CPU build of the
# same trimmed sdist, the tests and benches with CUDA layers requested but run on the CPU, at
# small sizes); the CUDA-only steps print what they would run.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu/run.sh OUT [--dry-run]}
DRY=0; [ "${2:-}" = "--dry-run" ] && DRY=1
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUNDLE=${GPU_BUNDLE:-$REPO/.gpu-bundle}
PY=${PY:-python3}
WORK=${GPU_WORK:-/tmp/llm-pool-gpu}
BUDGET=${GPU_RUN_BUDGET:-530}
# which parts: gguf (build + tests + P1 + batching), p2, exl3; e.g. GPU_RUN_PARTS=exl3 gives
# exllamav3's build every core and the whole budget
PARTS=",${GPU_RUN_PARTS:-gguf,p2,exl3},"
want() { [[ $PARTS == *",$1,"* ]]; }
NPROC=$(nproc)
T0=$(date +%s)
mkdir -p "$OUT"
rm -f "$OUT"/{summary.txt,run.log,env.txt,llama-build.log,exl3-build.log,tests.log,bench.log}
# GPU_RUN_REUSE=1: keep WORK from an earlier call on the same (still warm) machine, so the
# llama.cpp wheel and exllamav3's extension already built there are used again, not rebuilt
if [ "${GPU_RUN_REUSE:-0}" = 1 ] && [ -d "$WORK" ]; then
  rm -f "$WORK"/{llama,exl3}.rc; rm -rf "$WORK/venv" "$WORK/src" "$WORK/exl3"
else
  rm -rf "$WORK" && mkdir -p "$WORK"
fi
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/run.log") 2>&1
cd "$REPO"

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[$(elapsed)s] $*"; }
note() { echo "$*" >> "$OUT/summary.txt"; say "$*"; }
# step NAME SECONDS CMD...: run with a time limit (never past the deadline), log ok/FAILED.
step() {
  local name=$1 limit=$2; shift 2
  local l; l=$(left); [ "$limit" -gt "$l" ] && limit=$l
  if [ "$limit" -lt 10 ]; then note "SKIPPED $name: out of time ($(elapsed) s of $BUDGET)"; return 1; fi
  local t=$(date +%s) rc
  say "step $name (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@"; rc=$?
  local dt=$(( $(date +%s) - t ))
  case $rc in
    0) note "ok      $name (${dt}s)";;
    124|137) note "FAILED  $name: timed out after ${dt}s";;
    *) note "FAILED  $name: exit $rc (${dt}s)";;
  esac
  return $rc
}
# the GGUF steps' cores: 0-7 where the machine has 16 and taskset is there
CORES_A=(); [ "$NPROC" -ge 16 ] && command -v taskset >/dev/null && CORES_A=(taskset -c 0-7)
# pytest: only the plugins we name (the machine's image has pytest-xdist, -cov, -benchmark...)
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
PYTEST=(-m pytest -p pytest_trio.plugin)
# the whole suite's gpu-marked tests: modules that import what the bundle leaves behind (the
# openai SDK, openapi-spec-validator) are not collected; any other collection error is reported
# and the selected tests run all the same
SUITE=(tests --ignore=tests/openai --ignore=tests/ops/test_openapi.py --continue-on-collection-errors)
# one CUDA architecture for exllamav3's extension, the same in every process that imports it
# (its own default, from the device, would be "9.0+PTX": another build)
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC TORCH_EXTENSIONS_DIR=$WORK/torch_ext

# background builds in their own process group (killed at the deadline or on exit)
SETSID=(); command -v setsid >/dev/null && SETSID=(setsid)
BG_PGIDS=()
cleanup() { for g in "${BG_PGIDS[@]}"; do kill -- "-$g" 2>/dev/null; done; }
trap cleanup EXIT

echo "# llm-pool GPU run $(date -u +%FT%TZ) $( [ $DRY = 1 ] && echo DRY RUN) commit $(git rev-parse --short HEAD 2>/dev/null)" > "$OUT/summary.txt"

# ------------------------------------------------------------------ 0. the machine
{
  echo "nproc: $NPROC"; uname -a; "$PY" --version
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  nvcc --version 2>&1 | tail -2; cmake --version 2>&1 | head -1; ninja --version 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1
  free -g 2>&1 | head -2; df -h /tmp 2>&1 | tail -1
  # where the CUDA toolkit is: CMake's FindCUDAToolkit and torch's JIT need nvcc, cublas_v2.h
  # and libcublas under one root (or told where)
  echo "nvcc: $(command -v nvcc)  CUDA_HOME=${CUDA_HOME:-}  CUDA_PATH=${CUDA_PATH:-}"; ls -d /usr/local/cuda* 2>&1
  timeout 10 find /usr/local /opt /usr/include /usr/lib/x86_64-linux-gnu \( -name cublas_v2.h -o -name 'libcublas.so*' \) 2>/dev/null | head -8
  "$PY" -m pip list 2>/dev/null | grep -iE "^(setuptools|scikit.build.core|cmake|ninja|packaging|torch|numpy|transformers|pytest|werkzeug|h11|httpx|anyio|jinja2) "
} > "$OUT/env.txt" 2>&1
say "machine: $(head -5 "$OUT/env.txt" | tr '\n' ' ')"
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
if [ $DRY = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then note "FAILED  no GPU (nvidia-smi -L); use --dry-run on a CPU machine"; exit 1; fi

# ------------------------------------------------------------------ 1. Python: venv from the bundle
step deps 90 "$PY" bench/gpu/deps.py "$WORK/venv" --bundle "$BUNDLE" || exit 1
VPY=$WORK/venv/bin/python
export PYTHONUNBUFFERED=1

# ------------------------------------------------------------------ 2. builds, in the background
SDIST=$(ls "$BUNDLE"/llama_cpp_python-*-trimmed.tar.gz)
mkdir -p "$WORK/src" "$WORK/wheel"
tar xzf "$SDIST" -C "$WORK/src"
SRC=$(ls -d "$WORK"/src/llama_cpp_python-*)
CPU_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF"
if [ $DRY = 0 ]; then
  LLAMA_ARGS="$CPU_ARGS -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_GRAPHS=ON -DGGML_CUDA_NCCL=OFF"
  LLAMA_CACHE=""
else
  # the same sdist, built for the CPU once and cached: the dry run proves it builds offline
  LLAMA_ARGS=$CPU_ARGS
  LLAMA_CACHE=$HOME/.cache/llm-pool/wheels/gpu-dry-run-$(sha256sum "$SDIST" | cut -c1-12)
fi
say "llama-cpp-python: CMAKE_ARGS=$LLAMA_ARGS"
if ! want gguf && ! want p2; then
  echo 1 > "$WORK/llama.rc"; echo "not built: GPU_RUN_PARTS=$GPU_RUN_PARTS" > "$OUT/llama-build.log"
elif [ "${GPU_RUN_REUSE:-0}" = 1 ] && ls "$WORK"/wheel/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo 0 > "$WORK/llama.rc"; echo "reused $(ls "$WORK"/wheel/llama_cpp_python-*.whl) (GPU_RUN_REUSE=1)" > "$OUT/llama-build.log"
elif [ -n "$LLAMA_CACHE" ] && ls "$LLAMA_CACHE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  cp "$LLAMA_CACHE"/llama_cpp_python-*.whl "$WORK/wheel/"; echo 0 > "$WORK/llama.rc"
  echo "dry run: reusing $LLAMA_CACHE (built from this trimmed sdist)" > "$OUT/llama-build.log"
else
  "${SETSID[@]}" bash -c "CMAKE_ARGS='$LLAMA_ARGS' CMAKE_BUILD_PARALLEL_LEVEL=$NPROC '$VPY' -m pip wheel -v --no-index --no-deps \
    --no-build-isolation -C build-dir='$WORK/llama-build' -w '$WORK/wheel' '$SRC' > '$OUT/llama-build.log' 2>&1; \
    echo \$? > '$WORK/llama.rc'" &
  BG_PGIDS+=($!)
fi
LLAMA_T0=$(date +%s)

EXL3_T0=$(date +%s)
NICE=19; want gguf || want p2 || NICE=0
if ! want exl3; then
  echo 1 > "$WORK/exl3.rc"; echo "not built: GPU_RUN_PARTS=$GPU_RUN_PARTS" > "$OUT/exl3-build.log"; EXL3_PGID=""
elif [ $DRY = 0 ]; then
  # exllamav3 ships no binary: its first import JIT-compiles the CUDA extension (torch's ninja).
  "${SETSID[@]}" bash -c "cd '$WORK' && nice -n $NICE '$VPY' -c 'import exllamav3.ext as e; print(\"built\", e.exllamav3_ext.__file__)' > '$OUT/exl3-build.log' 2>&1; \
    echo \$? > '$WORK/exl3.rc'" &
  EXL3_PGID=$!; BG_PGIDS+=($EXL3_PGID)
else
  "$VPY" -c "import exllamav3" > "$OUT/exl3-build.log" 2>&1; echo "dry run: exllamav3's extension build needs torch with CUDA (rc $?)" >> "$OUT/exl3-build.log"
  echo 1 > "$WORK/exl3.rc"; EXL3_PGID=""
fi
# the extension's sources in a CUDA build (exllamav3/util/cuda_flags.py leaves rocm/ out)
NSRC=$("$PY" -c "import glob, re, zipfile; (w,) = glob.glob('$BUNDLE/wheels/exllamav3-*.whl')
print(sum(bool(re.search(r'exllamav3_ext/.*\.(cu|cpp)$', n)) and '/rocm/' not in n for n in zipfile.ZipFile(w).namelist()))")

# ------------------------------------------------------------------ 3. models (CPU, meanwhile)
M=$WORK/models
if [ $DRY = 0 ]; then
  GGUF_SHAPE=""  # Llama-3.2-1B's shape (bench/gpu/models.py)
  HF_SHAPE=""
else
  GGUF_SHAPE="--n-embd 256 --n-layer 2 --n-head 4 --n-head-kv 2 --n-ff 512 --n-vocab 4096"
  HF_SHAPE="--n-embd 128 --n-layer 2 --n-head 2 --n-head-kv 1 --n-ff 256 --n-vocab 512"
fi
step model-tiny 30 "$VPY" -m bench.gpu.models tiny "$M/tiny.gguf"
# shellcheck disable=SC2086
step model-gguf-1b 120 "$VPY" -m bench.gpu.models gguf "$M/random-1b-q8_0.gguf" --qtype q8_0 $GGUF_SHAPE
# shellcheck disable=SC2086
step model-hf 60 "$VPY" -m bench.gpu.models hf "$M/hf-llama" $HF_SHAPE
ls -la "$M" "$M/hf-llama" 2>&1 | sed 's/^/  /'

# ------------------------------------------------------------------ 4. wait for llama.cpp
while [ ! -f "$WORK/llama.rc" ] && [ "$(left)" -gt 200 ]; do sleep 2; done
if ! want gguf && ! want p2; then
  GGUF=0
elif [ "$(cat "$WORK/llama.rc" 2>/dev/null)" != 0 ]; then
  note "FAILED  llama-cpp-python build: $( [ -f "$WORK/llama.rc" ] && echo "exit $(cat "$WORK/llama.rc")" || echo "not done after $(( $(date +%s) - LLAMA_T0 ))s") (llama-build.log)"
  tail -30 "$OUT/llama-build.log"
  GGUF=0
else
  note "ok      llama-cpp-python build ($(( $(date +%s) - LLAMA_T0 ))s, CMAKE_ARGS=$LLAMA_ARGS)"
  [ -n "$LLAMA_CACHE" ] && mkdir -p "$LLAMA_CACHE" && cp -n "$WORK"/wheel/llama_cpp_python-*.whl "$LLAMA_CACHE/"
  step llama-install 60 "$VPY" -m pip install -q --no-index --no-deps --force-reinstall --no-compile "$WORK"/wheel/llama_cpp_python-*.whl
  GGUF=1
fi
# from now on the exllamav3 build keeps to cores 8-15 (the GGUF steps take 0-7)
if [ $GGUF = 1 ] && [ -n "$EXL3_PGID" ] && [ "$NPROC" -ge 16 ] && command -v taskset >/dev/null; then
  for p in $(pgrep -g "$EXL3_PGID"); do taskset -a -p -c 8-15 "$p" >/dev/null 2>&1; done
fi

# ------------------------------------------------------------------ 5. GGUF on CUDA (cores 0-7)
DRY_ENV=(); [ $DRY = 1 ] && DRY_ENV=(env LLM_POOL_GPU_DRY_RUN=1)
ALLOW_CPU=(); [ $DRY = 1 ] && ALLOW_CPU=(--allow-cpu)
BIG=$M/random-1b-q8_0.gguf
# llama.cpp threads per side: 4 of the GGUF steps' 8 cores; 1 on a small machine, where more
# threads than free cores spin-wait each other to a crawl
THREADS=1; [ "$NPROC" -ge 16 ] && THREADS=4
if [ $GGUF = 1 ] && want gguf; then
  step offload 90 "${CORES_A[@]}" "$VPY" -m bench.gpu.check_offload "$M/tiny.gguf" "$BIG" "${ALLOW_CPU[@]}" 2>&1 | tee -a "$OUT/bench.log"
  # the exact-output, streaming and cancel suites with every layer on the GPU
  step pytest-gguf-cuda 150 "${CORES_A[@]}" "${DRY_ENV[@]}" "$VPY" "${PYTEST[@]}" -p bench.gpu.cuda_gguf -q -rs \
    tests/gguf tests/reliability/test_r1_load.py tests/reliability/test_r3_faults.py 2>&1 | tee -a "$OUT/tests.log" | tail -15
  # any gpu-marked test outside tests/exl3 (pytest's 5, "no tests ran", is not a failure)
  step pytest-m-gpu-gguf 60 "${CORES_A[@]}" bash -c '"$0" "$@"; r=$?; [ $r = 5 ] && echo "no gpu-marked tests outside tests/exl3" && r=0; exit $r' \
    "$VPY" "${PYTEST[@]}" -m gpu "${SUITE[@]}" --ignore=tests/exl3 -q -rs 2>&1 | tee -a "$OUT/tests.log" | tail -5
  step bench-p1-pool-vs-direct 120 "${CORES_A[@]}" "$VPY" -m bench.gguf_pool --parts p1 --model "$BIG" --n-gpu-layers -1 \
    --threads $THREADS --tokens 128 --rounds 3 2>&1 | tee -a "$OUT/bench.log"
  step bench-gguf-batching 150 "${CORES_A[@]}" "$VPY" -m bench.gguf_batching --model "$BIG" --n-gpu-layers -1 \
    --threads $THREADS --tokens 128 --rounds 3 --raw-steps 32 2>&1 | tee -a "$OUT/bench.log"
elif want gguf; then
  note "SKIPPED GGUF steps: no llama-cpp-python build"
fi
if [ $GGUF = 1 ] && want p2; then
  PIN=(); [ "$NPROC" -ge 16 ] && PIN=(--pin 0:1-2:3-7)
  step bench-p2-overhead 90 "$VPY" -m bench.gguf_pool --parts p2 --requests 400 "${PIN[@]}" 2>&1 | tee -a "$OUT/bench.log"
fi

# ------------------------------------------------------------------ 6. ExLlamaV3
NEED_EXL3=130  # seconds the ExLlamaV3 steps need once the extension is built
while [ ! -f "$WORK/exl3.rc" ] && [ "$(left)" -gt $NEED_EXL3 ]; do sleep 2; done
NOBJ=$(find "$WORK/torch_ext" -name '*.o' 2>/dev/null | wc -l)
if [ "$(cat "$WORK/exl3.rc" 2>/dev/null)" = 0 ]; then
  note "ok      exllamav3 extension build ($(( $(date +%s) - EXL3_T0 ))s, $NSRC sources, TORCH_CUDA_ARCH_LIST=9.0)"
  # -s: the throughput test prints its c=1 / c=8 tokens/s
  step pytest-m-gpu-exl3 100 "$VPY" "${PYTEST[@]}" -m gpu tests/exl3 -q -rs -s 2>&1 | tee -a "$OUT/tests.log" | tail -15
  step bench-exl3 150 "$VPY" -m bench.gpu.exl3_bench "$M/hf-llama" "$WORK/exl3" --tokens 256 --rounds 2 2>&1 | tee -a "$OUT/bench.log"
elif ! want exl3; then
  note "SKIPPED ExLlamaV3 steps: GPU_RUN_PARTS=$GPU_RUN_PARTS"
elif [ $DRY = 1 ]; then
  note "SKIPPED ExLlamaV3 steps in the dry run: they need CUDA (would run: pytest -m gpu tests/exl3; bench.gpu.exl3_bench)"
  step pytest-m-gpu-exl3-collect 60 "$VPY" "${PYTEST[@]}" -m gpu tests/exl3 -q -rs --collect-only 2>&1 | tee -a "$OUT/tests.log" | tail -5
else
  STATE=$( [ -f "$WORK/exl3.rc" ] && echo "exit $(cat "$WORK/exl3.rc")" || echo "not finished" )
  note "SKIPPED ExLlamaV3 steps: its extension build $STATE after $(( $(date +%s) - EXL3_T0 ))s ($NOBJ of $NSRC objects built; exl3-build.log)"
  [ -n "$EXL3_PGID" ] && kill -- "-$EXL3_PGID" 2>/dev/null
  tail -20 "$OUT/exl3-build.log"
fi

# ------------------------------------------------------------------ 7. summary
{
  echo "# figures"
  grep -hE "^(P1|P2|ratio|batched|direct|p50|worst|ceiling|exllamav3|most sequences)|tok/s|all layers on the GPU|passed|failed|error" \
    "$OUT/bench.log" "$OUT/tests.log" 2>/dev/null | grep -vE "^(  llama.cpp|\[)" | head -60
  echo "# total $(elapsed)s of $BUDGET s budget"
} >> "$OUT/summary.txt"
say "done in $(elapsed)s"; cat "$OUT/summary.txt"
