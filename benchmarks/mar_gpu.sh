#!/usr/bin/env bash
# MAR on the default teacher (SmolLM2-135M-Instruct) on one GPU: Stage 1 + Stage 2 with the `gpu`
# preset on WikiText-2 train plus teacher-generated text, then evaluation (the dev suite of
# docs/evaluation.md for teacher / Stage-1 / student, WikiText-2 valid perplexity / KL /
# agreement, ARC-Easy and ARC-Challenge dev, firing rates, energy at 512 and
# 4096, binary-neuron ablation, fused vs reference training throughput) in the same run.
#
# Usage (repository root, on the GPU machine):  bash benchmarks/mar_gpu.sh
#   DATA=dir     holds wikitext-2-raw/{train,valid}.txt, arc/ARC-{Easy,Challenge}-validation.jsonl and
#                dev-tasks/ (the dev suite's files, docs/evaluation.md) (default .data)
#   RESULTS=dir  where report.json/report.md/plots/log are copied (default $OUT or benchmarks/results/mar_gpu)
#   RUN=dir      the run folder with the trained weights (default /tmp/mar_gpu_run; --resume continues it)
#   EXTRA="..."  more `neuro-mar refine` flags, e.g. shorter budgets: "--seconds-1c 160 --seconds-2 200"
# Setup on the machine: benchmarks/device_env.sh (wheels from .whl/, mamba_ssm from .carry/mamba/,
# the teacher's GGUF assembled from three carried parts and checked against its sha256).
set -uo pipefail
RESULTS=${RESULTS:-${OUT:-benchmarks/results/mar_gpu}}
RUN=${RUN:-/tmp/mar_gpu_run}
EXTRA=${EXTRA:-}
DATA=${DATA:-.data}
mkdir -p "$RESULTS"
LOG="$RESULTS/refine.log"
# the device tool re-syncs the working tree on every call and drops ignored folders a call does not
# carry (.data/ vanished under a running job once): read the data from a copy outside the checkout
mkdir -p /tmp/mar_gpu_data
cp -r "$DATA/wikitext-2-raw" "$DATA/arc" "$DATA/dev-tasks" /tmp/mar_gpu_data/ \
  || { echo "no WikiText-2 / ARC / dev-tasks under $DATA"; exit 1; }
DATA=/tmp/mar_gpu_data
NEED_TEACHER=1 source benchmarks/device_env.sh || exit 1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/gpu_info.txt"
resume=""
[ -d "$RUN" ] && resume="--resume"
start=$(date +%s)
# shellcheck disable=SC2086
python3 -P -m neuro_mar refine --preset gpu --out "$RUN" $resume \
  --data "$DATA/wikitext-2-raw/train.txt" \
  --eval-suite dev --eval-suite-dir "$DATA" \
  --eval-data "$DATA/wikitext-2-raw/valid.txt" $EXTRA 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
for f in report.json report.md loss_curves.png firing_rates.png metrics.jsonl refine_config.json; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$RESULTS/"
done
exit "$rc"
