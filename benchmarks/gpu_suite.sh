#!/usr/bin/env bash
# The GPU suite: the CUDA tests and every benchmark in one command, on a machine with an NVIDIA GPU (no network
# needed).
#
#   bash benchmarks/gpu_suite.sh [--out DIR] [--part core|memory]
#
# Installs the package from this working tree without downloads, builds the native host arena, runs the
# CUDA-marked tests and every benchmark, each under its own timeout, all within SUITE_BUDGET_S seconds (default
# 540). A failing or timed-out step does not stop the others; the exit status is non-zero when any step failed.
# --part memory runs instead the LISA fine-tuning of the 7B and 8B shapes capped at 20 GB and 24 GB of device
# memory (bench_finetune --memory-limit-gb, gradient checkpointing; frozen layers' weights in host memory at 20 GB).
# Results go to DIR: --out DIR, else $LISA_BENCH_RESULTS, else benchmarks/results/. There: each benchmark's JSON
# (+ .png charts), the full log gpu_suite.log and a per-step summary gpu_suite-<device>.json.
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_suite.sh [--out DIR] [--part core|memory]" >&2; exit 2; }
RESULTS="${LISA_BENCH_RESULTS:-}"
PART=core
while (($#)); do
    case $1 in
        --out) (($# >= 2)) || usage; RESULTS=$2; shift 2 ;;
        --out=*) RESULTS=${1#--out=}; shift ;;
        --part) (($# >= 2)) || usage; PART=$2; shift 2 ;;
        --part=*) PART=${1#--part=}; shift ;;
        -h|--help) usage ;;
        *) echo "gpu_suite: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ $PART == core || $PART == memory ]] || { echo "gpu_suite: --part must be core or memory, got '$PART'" >&2; usage; }
if [[ -n "$RESULTS" ]]; then  # made absolute now, as the suite runs from the repository root
    RESULTS="$(mkdir -p -- "$RESULTS" && cd -- "$RESULTS" && pwd)" || { echo "gpu_suite: cannot create $RESULTS" >&2; exit 2; }
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
BUDGET="${SUITE_BUDGET_S:-540}"
RESULTS="${RESULTS:-$ROOT/benchmarks/results}"
export LISA_BENCH_RESULTS="$RESULTS"  # every benchmark writes there
LOG="$RESULTS/gpu_suite.log"
START=$SECONDS
mkdir -p "$RESULTS"
: > "$LOG"
# Imports come from this tree whether or not the editable install below succeeds.
export PYTHONPATH="$ROOT:$ROOT/python_api${PYTHONPATH:+:$PYTHONPATH}"

STEPS=()     # "name rc seconds" per step
FAILED=()

log() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CAP_SECONDS COMMAND...: run COMMAND under min(CAP, time left in the budget); record its outcome.
step() {
    local name=$1 cap=$2
    shift 2
    local left
    left=$(left)
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        log "=== [$name] skipped: suite budget spent"
        STEPS+=("$name skipped 0")
        FAILED+=("$name (skipped: budget)")
        return
    fi
    log "=== [$name] timeout ${limit}s: $*"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0))
    STEPS+=("$name $rc $took")
    if ((rc == 124 || rc == 137)); then
        log "=== [$name] TIMED OUT after ${took}s"
        FAILED+=("$name (timeout ${limit}s)")
    elif ((rc != 0)); then
        log "=== [$name] FAILED rc=$rc after ${took}s"
        FAILED+=("$name (rc=$rc)")
    else
        log "=== [$name] ok in ${took}s"
    fi
}

log "gpu_suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, results in $RESULTS, commit $(git rev-parse --short HEAD 2>/dev/null || echo none)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true
# SUITE_ALLOW_CPU=1 runs the suite's own logic on a CPU machine (to check this script; the figures mean nothing).
if [[ "${SUITE_ALLOW_CPU:-0}" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "gpu_suite: torch sees no CUDA device; this suite is for GPU machines (on CPU: python -m pytest)"
    exit 2
fi

step install 120 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
step native-build 150 "$PY" -m lisa_kernels.build
if [[ $PART == memory ]]; then
    # LISA park, γ=2, seq 1024 x batch 1, gradient checkpointing, chunked loss: does each fit the card? 32 offloaded
    # layers: every frozen layer's weights in host memory; 0: lisa-finetune's defaults.
    for run in "8b 20 32" "7b 20 32" "7b 24 0"; do
        read -r shape gb offload <<< "$run"
        name="finetune-$shape-${gb}gb-offload$offload"
        step "$name" 130 "$PY" -m benchmarks.bench_finetune --shape "$shape" --methods lisa-park --steps 12 \
            --interval 5 --warmup 2 --batch-size 1 --seq-len 1024 --gradient-checkpointing --chunked-loss \
            --offload-frozen-layers "$offload" --memory-limit-gb "$gb" --time-budget 90 --name "$name"
    done
else
    step pytest-cuda 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider
    step bench_adamw 75 "$PY" -m benchmarks.bench_adamw
    step bench_offload 75 "$PY" -m benchmarks.bench_offload
    step bench_linear_cross_entropy 60 "$PY" -m benchmarks.bench_linear_cross_entropy
    # bench_finetune stops starting methods at --time-budget and still writes its JSON, so each run gets a budget 40 s
    # under its step's timeout. 45 steps = switches at 20 and 40 (K=20): two stalls per LISA method.
    limit=$(( $(left) < 240 ? $(left) : 240 ))
    if ((limit >= 100)); then
        step finetune-1b "$limit" "$PY" -m benchmarks.bench_finetune --shape 1b --steps 45 --time-budget $((limit - 40))
    else
        log "=== [finetune-1b] skipped: only ${limit}s left in the budget"
        STEPS+=("finetune-1b skipped 0")
        FAILED+=("finetune-1b (skipped: budget)")
    fi
    # 7B where time allows, the methods that answer the package's claims first.
    limit=$(($(left) - 15))
    if ((limit >= 100)); then
        step finetune-7b "$limit" "$PY" -m benchmarks.bench_finetune --shape 7b --steps 30 --time-budget $((limit - 40)) \
            --methods lisa-park,lora,full,lisa-public,lisa-keep,lisa-reset
    else
        log "=== [finetune-7b] skipped: only ${limit}s left in the budget"
        STEPS+=("finetune-7b skipped 0")
    fi
fi

# Per-step summary with the environment, through the same harness the benchmarks use.
"$PY" - "${STEPS[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import sys
from benchmarks.common import print_table, write_results

steps = []
for entry in sys.argv[1:]:
    name, rc, seconds = entry.split()
    status = "skipped" if rc == "skipped" else "ok" if rc == "0" else "timeout" if rc in ("124", "137") else "failed"
    steps.append({"step": name, "status": status, "rc": None if rc == "skipped" else int(rc), "seconds": int(seconds)})
print_table(steps, title="\ngpu_suite")
print("summary:", write_results("gpu_suite", {"benchmark": "gpu_suite", "steps": steps}))
EOF

if ((${#FAILED[@]})); then
    log "gpu_suite: FAILED after $((SECONDS - START))s: ${FAILED[*]}"
    status=1
else
    log "gpu_suite: all steps passed in $((SECONDS - START))s"
    status=0
fi
exit $status
