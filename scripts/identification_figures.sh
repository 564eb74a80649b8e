#!/usr/bin/env bash
# The README's identification figures of the LFW recipe's model, from the repository root:
#   bash scripts/identification_figures.sh [CHECKPOINT_OR_RUN_DIR] [OUT]     (defaults: runs/lfw, results/lfw/identification)
# 1. verification metrics of fold 10 (mbembed eval: pair_distances.csv, for `search --far`);
# 2. the identification protocol of configs/identification/lfw_fold10 (rank-k, DIR@FPIR, CMC, DET);
# 3. a real gallery (the protocol's 181 gallery images, linked into an identity folder), enrolled,
#    then searched with the first two probes and the first two distractors at FAR 0.01 (pairs)
#    and at FPIR 0.01 (the identification eval of step 2).
# MBEMBED overrides the command (e.g. a wrapper that runs this checkout's mobilenet_embed.cli.run);
# by default it is `mbembed` on PATH, else this checkout's .venv/bin/mbembed (an environment not activated).
set -euo pipefail
CKPT=${1:-runs/lfw}
OUT=${2:-results/lfw/identification}
if [ -z "${MBEMBED:-}" ]; then
    if command -v mbembed >/dev/null; then MBEMBED=mbembed
    elif [ -x .venv/bin/mbembed ]; then MBEMBED=$(pwd)/.venv/bin/mbembed
    else echo "mbembed: not on PATH nor in .venv/bin: install the package or set MBEMBED" >&2; exit 2; fi
fi
ROOT=$(cd ../shared/data/lfw/images_deepfunneled && pwd)
PROTO=configs/identification/lfw_fold10
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$MBEMBED eval --config configs/lfw.yaml --checkpoint "$CKPT" --out "$TMP/eval" | tee "$OUT/verification.log"
cp "$TMP/eval/metrics.json" "$OUT/verification_metrics.json"
$MBEMBED eval --config configs/lfw.yaml --checkpoint "$CKPT" --protocol identification --id-protocol $PROTO \
    --out "$OUT" | tee "$OUT/identification.log"
grep -v '^#' $PROTO/gallery.txt | while IFS=$'\t' read -r name rel; do
    mkdir -p "$TMP/gallery/$name" && ln -s "$ROOT/$rel" "$TMP/gallery/$name/"; done
$MBEMBED enroll --config configs/lfw.yaml --model "$CKPT" --data "$TMP/gallery" --out "$TMP/index" 2>&1 | tee "$OUT/enroll.log"
QUERIES="$(grep -v '^#' $PROTO/probes.txt | head -2 | cut -f2) $(grep -v '^#' $PROTO/distractors.txt | head -2 | cut -f2)"
(cd "$ROOT" && $MBEMBED search --index "$TMP/index" $QUERIES --far 0.01 --metrics "$TMP/eval/metrics.json" \
    --top-k 3 --format table) 2>&1 | tee "$OUT/search.log"
# the same queries with the open-set threshold of the identification eval (FPIR 0.01)
(cd "$ROOT" && $MBEMBED search --index "$TMP/index" $QUERIES --fpir 0.01 --identification "$OUT/identification.json" \
    --top-k 3 --format table) 2>&1 | tee "$OUT/search_fpir.log"
