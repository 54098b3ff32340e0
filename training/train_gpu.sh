#!/usr/bin/env bash
# The CNN variants on a GPU machine that has torch with CUDA but not the datasets: seeds, leave-one-source-out and
# widths, trained in parallel from the CNN pack, each with `leukograph train --stages cnn --cnn-pack ... --device cuda`.
# The GNN stage and the evaluation then run where the datasets are (OUT_DIR/cnn-<run>.pt copied to RUN/cnn_best.pt,
# `leukograph train --stages gnn --output-dir RUN --release-dir RUN-release` with the run's own arguments, which
# releases that CNN beside its GNN and calibration; `leukograph evaluate --weights RUN-release` or `--loso`).
#
#   leukograph train --stages cnn --save-cnn-pack .gpu/cnn-pack.pt   # where the datasets are (~48 MB)
#     (--pack-quality 92: 39 MB, for machines that take ~64 MB with the repository; JPEG quality of the crops)
#   bash training/train_gpu.sh .gpu/cnn-pack.pt OUT_DIR               # on the GPU machine, in the repository root
#
# Every variant trains with `leukograph train`'s defaults beyond its own arguments, the consistency term on unlabelled
# white cells included (`--unlabelled-weight 1`): a pack written before the term holds no unlabelled cells, and
# training from it says so and runs without the term; write the pack again.
#
# Writes OUT_DIR/cnn-<run>.pt (released checkpoints) and OUT_DIR/train-logs.txt. Environment: PYTHON (python3),
# EPOCHS (40), THREADS (threads per run, 2), RUNS (default: the first six below; the aug* runs compare
# augmentation strengths, each also without PBC and without BCCD; the s1-* runs are the capacity table's rows at
# strength 1.0 (widths, a second seed, without PBC, without BCCD) for a pack of another crop side, written by
# `leukograph train --stages cnn --crop-size 96 --save-cnn-pack PACK`: the crop side comes from the pack; the
# no-pbc-s* and no-bccd-s* runs are more seeds of leaving one source out).
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:?usage: training/train_gpu.sh PACK OUT_DIR}
OUT_DIR=${2:?usage: training/train_gpu.sh PACK OUT_DIR}
PYTHON=${PYTHON:-python3}
EPOCHS=${EPOCHS:-40}
THREADS=${THREADS:-2}
SITE=${SITE:-/tmp/leukograph-site}
declare -A VARIANTS=(
  [seed0]="--seed 0"
  [seed1]="--seed 1"
  [no-pbc]="--exclude-source pbc"
  [no-bccd]="--exclude-source bccd"
  [width24]="--cnn-width 24"
  [width48]="--cnn-width 48"
  [aug15]="--aug-strength 1.5"
  [aug15-no-pbc]="--aug-strength 1.5 --exclude-source pbc"
  [aug15-no-bccd]="--aug-strength 1.5 --exclude-source bccd"
  [aug2]="--aug-strength 2"
  [aug2-no-pbc]="--aug-strength 2 --exclude-source pbc"
  [aug2-no-bccd]="--aug-strength 2 --exclude-source bccd"
  [s1-width24]="--aug-strength 1 --cnn-width 24"
  [s1-width32]="--aug-strength 1"
  [s1-width48]="--aug-strength 1 --cnn-width 48"
  [s1-seed1]="--aug-strength 1 --seed 1"
  [s1-no-pbc]="--aug-strength 1 --exclude-source pbc"
  [s1-no-bccd]="--aug-strength 1 --exclude-source bccd"
  [no-pbc-s2]="--exclude-source pbc --seed 2"
  [no-pbc-s3]="--exclude-source pbc --seed 3"
  [no-bccd-s1]="--exclude-source bccd --seed 1"
  [no-bccd-s2]="--exclude-source bccd --seed 2"
  [no-bccd-s3]="--exclude-source bccd --seed 3"
  [no-bccd-s4]="--exclude-source bccd --seed 4"
)
RUNS=${RUNS:-"seed0 seed1 no-pbc no-bccd width24 width48"}

# leukograph without installing it: the four packages under one namespace folder (paths resolve to this repo).
mkdir -p "$SITE/leukograph" "$OUT_DIR"
for part in client training build_engines deploy; do
  ln -sfn "$PWD/$part" "$SITE/leukograph/$part"
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=$(mktemp -d)
pids=()
for run in $RUNS; do
  # shellcheck disable=SC2086  # the variant's arguments are a list of words
  "$PYTHON" -m leukograph.client.cli train --stages cnn --cnn-pack "$PACK" --device cuda --threads "$THREADS" \
    --cnn-epochs "$EPOCHS" --output-dir "$work/$run" --release-dir "$work/$run-release" ${VARIANTS[$run]} \
    > "$work/$run.log" 2>&1 &
  pids+=("$!")
done
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=1
done
for run in $RUNS; do
  { echo "== $run: ${VARIANTS[$run]}"; tr '\r' '\n' < "$work/$run.log" | grep -v -E '[0-9]+/[0-9]+ \[' || true; } \
    >> "$OUT_DIR/train-logs.txt"
  if [ -f "$work/$run-release/cnn.pt" ]; then
    cp "$work/$run-release/cnn.pt" "$OUT_DIR/cnn-$run.pt"
  else
    echo "$run: no checkpoint" >&2
    failed=1
  fi
done
exit "$failed"
