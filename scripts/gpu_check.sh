#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, the quick start with float32, mixed_float16 and XLA,
# and the LFW recipe's training-step benchmark; prints images/s and peak GPU memory for each and
# writes gpu_check/summary.json. Bounded: each run has a time limit (the whole script < 8 minutes).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check
#
# Uses the active Python when it already has TensorFlow with a GPU, else makes .gpu-venv with the
# package's `gpu` extra (tensorflow[and-cuda]). LFW is read from ../shared/data/lfw when present;
# without it the step benchmark runs on synthetic images at the recipe's size.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "Error: gpu_check.sh: no NVIDIA GPU here (nvidia-smi not found or lists no GPU)" >&2
    exit 2
fi
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpus.txt"

PY=python3
if ! $PY -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null; then
    [ -x .gpu-venv/bin/python ] || { python3 -m venv .gpu-venv && .gpu-venv/bin/pip install -q -e ".[gpu]"; }
    PY=.gpu-venv/bin/python
fi
$PY -c "import tensorflow as tf; print('TensorFlow', tf.__version__, tf.config.list_physical_devices('GPU'))"
export TF_CPP_MIN_LOG_LEVEL=2

# run NAME LIMIT_S CMD...: runs CMD with nvidia-smi sampling used memory every 0.2 s; appends
# "NAME<TAB>images/s<TAB>peak MiB<TAB>exit code" to $OUT/rows.tsv.
run() {
    local name=$1 limit=$2; shift 2
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$name.mem" &
    local sampler=$! rc=0
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    local peak rate
    peak=$(sort -n "$OUT/$name.mem" | tail -1)
    rate=$(grep -oE '[0-9.]+ images/s' "$OUT/$name.log" | tail -1 | cut -d' ' -f1 || true)
    if [ -f "$OUT/$name.json" ]; then  # a benchmark: its JSON's mbembed train median
        rate=$("$PY" -c "import json, sys; print(round(json.load(open(sys.argv[1]))['mbembed_train']['median'], 1))" \
               "$OUT/$name.json" 2>/dev/null || echo "?")
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "${rate:-?}" "${peak:-?}" "$rc" | tee -a "$OUT/rows.tsv"
}

: > "$OUT/rows.tsv"
MB=("$PY" -c "import sys; from mobilenet_embed.cli import run; sys.argv[0] = 'mbembed'; run()")
COMMON=(--config configs/quickstart.yaml --set train.epochs=1 --set train.steps_per_epoch=300 --fresh --force)
run quickstart_float32 150 "${MB[@]}" train "${COMMON[@]}" --set "run_dir=$OUT/runs/float32"
run quickstart_mixed_float16 150 "${MB[@]}" train "${COMMON[@]}" --set "run_dir=$OUT/runs/fp16" \
    --set train.precision=mixed_float16
run quickstart_xla 150 "${MB[@]}" train "${COMMON[@]}" --set "run_dir=$OUT/runs/xla" --set train.jit_compile=true
LFW=../shared/data/lfw/images_deepfunneled
DATA=(); [ -d "$LFW" ] && DATA=(--data "$LFW" --crop-fraction 0.55)
run lfw_step_benchmark 150 "$PY" scripts/bench.py train "${DATA[@]}" --image-size 96 --alpha 0.5 --P 32 --K 4 \
    --steps 100 --repeats 2 --out "$OUT/lfw_step_benchmark.json"

$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
rows = [line.rstrip("\n").split("\t") for line in open(f"{out}/rows.tsv")]
print(f"\n{'run':<28}{'images/s':>10}{'peak GPU MiB':>14}{'exit':>6}")
for name, rate, peak, rc in rows:
    print(f"{name:<28}{rate:>10}{peak:>14}{rc:>6}")
json.dump([dict(zip(("run", "images_per_s", "peak_gpu_mib", "exit_code"), r)) for r in rows],
          open(f"{out}/summary.json", "w"), indent=1)
print(f"wrote {out}/summary.json")
PYEOF
