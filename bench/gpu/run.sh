#!/usr/bin/env bash
# The GPU kit's one command: prove and measure tensorfleet's GPU path in one short run.
#
#   bash bench/gpu/run.sh --out DIR [--quick] [--rehearse] [--only STEP,STEP...]
#
# On the GPU machine (no network): installs .gpu-wheels/cp312 (from `make gpu-wheels`, carried
# beside the working tree) offline into a temp folder, makes the checkout importable as
# `tensorfleet` (bench/gpu/project_path.py), checks the CUDA device, runs `pytest -m gpu`, then
# the GPU rows of docs/performance.md at sizes that fit. Each step has its own time limit and a
# failing step does not stop the next. Writes DIR/summary.json, DIR/summary.md and DIR/run.log
# (every step's output). Full run under 9 minutes, --quick under 4.
#
# --rehearse: the same script on a CPU machine: device cpu, tiny sizes, the same offline install
# (Python 3.11 here: the compiled wheels come from .gpu-wheels/cp311). PYTHON picks the
# interpreter (default: python3; with --rehearse, .venv/bin/python when there).
# --only: run just these steps (names as in summary.md; install always runs), e.g. to
# rerun one that failed. GPU_WHEELS: the wheels folder (default .gpu-wheels). GPU_KIT_BUDGET_S:
# the whole run's seconds (default 525 full, 225 quick, 600 rehearse).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="" QUICK=0 REHEARSE=0 ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --rehearse) REHEARSE=1; shift ;;
        --only) ONLY=",${2:?--only needs step names},"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$OUT_DIR" ] || { echo "run.sh: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$REPO"

if [ "$REHEARSE" = 1 ]; then
    MODE=rehearse DEVICE=cpu
    [ -x "$REPO/.venv/bin/python" ] && PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
else
    MODE=$([ "$QUICK" = 1 ] && echo quick || echo full) DEVICE=cuda
fi
PY="${PYTHON:-python3}"
WHEELS="${GPU_WHEELS:-$REPO/.gpu-wheels}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tensorfleet-gpu-kit.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/run.log"
: >"$LOG"
rm -f "$OUT_DIR/steps.jsonl" "$OUT_DIR/summary.json" "$OUT_DIR/summary.md"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# the whole run's budget: each step's limit shrinks to what is left, and a step that would get
# under 15 s is skipped (and recorded so), so the run ends inside its promise whatever happens
case "$MODE" in full) BUDGET=525 ;; quick) BUDGET=225 ;; *) BUDGET=600 ;; esac
BUDGET="${GPU_KIT_BUDGET_S:-$BUDGET}"
RUN_START=$(date +%s)
echo "run.sh: mode $MODE, device $DEVICE, python $PY, out $OUT_DIR" | tee -a "$LOG"

# step NAME LIMIT_SECONDS COMMAND...: run it in its own process group under `timeout`, log its
# output, record it; whatever it started (servers) is killed with its group when it ends.
step() {
    local name="$1" limit="$2"; shift 2
    if [ -n "$ONLY" ] && [ "$name" != install ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
    local output="$WORK/$name.out" start rc seconds left
    left=$(( BUDGET - ($(date +%s) - RUN_START) ))
    if [ "$left" -lt 15 ]; then
        echo "=== step $name: skipped, ${left}s left of the run's ${BUDGET}s" | tee -a "$LOG" "$output" >/dev/null
        "$PY" -m bench.gpu.summary record "$OUT_DIR" "$name" -1 0 "$limit" "$output" -- "$@"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== step $name (limit ${limit}s): $*" | tee -a "$LOG"
    start=$(date +%s%N)
    setsid timeout -k 10 "$limit" "$@" >"$output" 2>&1 </dev/null &
    local pid=$!
    wait "$pid"; rc=$?
    kill -KILL -- "-$pid" 2>/dev/null
    seconds=$(( ($(date +%s%N) - start) / 1000000 ))
    seconds=$(printf '%d.%03d' $((seconds / 1000)) $((seconds % 1000)))
    cat "$output" >>"$LOG"
    echo "=== step $name: exit $rc after ${seconds}s" | tee -a "$LOG"
    "$PY" -m bench.gpu.summary record "$OUT_DIR" "$name" "$rc" "$seconds" "$limit" \
        "$output" -- "$@" || echo "run.sh: could not record step $name" >&2
}

# 1. the wheels, offline, into a temp folder; the checkout as the package `tensorfleet`
install_kit() {
    [ -d "$WHEELS/cp312" ] || { echo "no $WHEELS/cp312: run 'make gpu-wheels' where the package index is" \
        "reachable and carry .gpu-wheels (docs/performance.md, 'The GPU kit')"; return 1; }
    local links=(--find-links "$WHEELS/cp312")
    [ "$REHEARSE" = 1 ] && links+=(--find-links "$WHEELS/cp311")
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$WORK/site" "${links[@]}" -r bench/gpu/requirements.txt || return 1
    "$PY" bench/gpu/project_path.py "$WORK/project"
}
export -f install_kit
export WHEELS WORK REHEARSE PY
step install 90 bash -c install_kit
export PYTHONPATH="$WORK/site:$WORK/project:$REPO${PYTHONPATH:+:$PYTHONPATH}"
# the carried pytest with only the plugins the project uses: the machine's own plugins (built
# for its own pytest) stay out
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
PYTEST=("$PY" -m pytest -p pytest_asyncio.plugin -p pytest_timeout -p no:cacheprovider -q -rs)

# 2. the device
step device 60 "$PY" -m bench.gpu.device_check --device "$DEVICE" --kit "$WORK/site"

# 3. the gpu-marked tests: real CUDA servers (on the rehearsal, the device-generic ones run on
#    the CPU and the CUDA-only ones skip)
if [ "$REHEARSE" = 1 ]; then export TENSORFLEET_GPU_TESTS_ON_CPU=1; else export TENSORFLEET_GPU_TESTS_REQUIRE_CUDA=1; fi
step pytest-gpu "$([ "$QUICK" = 1 ] && echo 100 || echo 150)" "${PYTEST[@]}" -s -W ignore::DeprecationWarning -m gpu tests/gpu tests/services/backends/test_torch_backends.py

# 4. the GPU rows of docs/performance.md, at sizes that fit the time (each prints its JSON line)
ESM_8M=(--layers 6 --dim 320 --heads 20)
ESM_650M=(--layers 33 --dim 1280 --heads 20)
if [ "$REHEARSE" = 1 ]; then
    TINY=(--device cpu --layers 1 --dim 32 --heads 2 --precision fp32)
    step serve-overhead-tiny 120 "$PY" -m bench.serve_overhead "${TINY[@]}" --median 40 --sequences 16 \
        --batch 8 --window 2 --rounds 1
    step end-to-end-tiny 120 "$PY" -m bench.end_to_end --device cpu --quick
else
    GPU=(--device cuda --precision bf16)
    step serve-overhead-8M-bf16 60 "$PY" -m bench.serve_overhead "${GPU[@]}" "${ESM_8M[@]}" --median 300 \
        --sequences 4096 --window 8 --rounds 1
    "$PY" examples/data/make_fasta.py --count 20000 --median 300 --out "$WORK/big.fasta" >>"$LOG" 2>&1
    step end-to-end-8M-bf16 "$([ "$QUICK" = 1 ] && echo 50 || echo 80)" "$PY" -m bench.end_to_end "${GPU[@]}" \
        "${ESM_8M[@]}" --batch 64 --token-budget 65536 --fasta "$WORK/big.fasta" --sequences 20000 --threads 4 \
        --rounds 1
    if [ "$QUICK" = 0 ]; then
        # the 650M repositories once (fixed-seed random weights), for the two serve_overhead rows
        build_650m() {
            "$PY" examples/build_models.py --out "$WORK/m650" "${ESM_650M[@]}" --precision bf16 &&
            "$PY" examples/build_models.py --out "$WORK/m650-residues" "${ESM_650M[@]}" --precision bf16 \
                --per-residue FP16
        }
        export -f build_650m
        export ESM_650M_ARGS="${ESM_650M[*]}"
        step build-650M 100 bash -c 'ESM_650M=($ESM_650M_ARGS); build_650m'
        step serve-overhead-650M-bf16 90 "$PY" -m bench.serve_overhead "${GPU[@]}" "${ESM_650M[@]}" \
            --median 300 --sequences 2048 --window 8 --rounds 1 --repository "$WORK/m650"
        step per-residue-650M-fp16 70 "$PY" -m bench.serve_overhead "${GPU[@]}" "${ESM_650M[@]}" \
            --median 300 --sequences 1024 --window 8 --rounds 1 --per-residue FP16 \
            --repository "$WORK/m650-residues"
        step end-to-end-650M-bf16 90 "$PY" -m bench.end_to_end "${GPU[@]}" "${ESM_650M[@]}" --batch 64 \
            --token-budget 65536 --fasta "$WORK/big.fasta" --sequences 2000 --threads 4 --rounds 1
    fi
fi

"$PY" -m bench.gpu.summary write "$OUT_DIR" --mode "$MODE" | tee -a "$LOG"
# exit 0 only when every step passed
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["passed"] else 1)' "$OUT_DIR/summary.json"
