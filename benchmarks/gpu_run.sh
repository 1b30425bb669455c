#!/usr/bin/env bash
# Everything this project checks on the lent GPU, in one call (benchmarks/README.md; the kernels' GPU tests: docs/kernels.md).
# Expects the wheels in .whl/ (spikingjelly, loguru, snntorch, liger-kernel) and mamba_ssm's Python
# package in .carry/mamba/ (see benchmarks/README.md); writes logs and JSON under $OUT.
# Usage: STAGES="tests atmn" bash benchmarks/gpu_run.sh
# Stages: tests (kernel + SSM test files), gputests (their GPU-relevant subset), gpumark (only the
# tests marked gpu: full sizes, quickest), atmntests (the ATMN kernel tests only), atmn, sbds
# (benchmarks), atmntune (tile sweep of the raw ATMN kernels), atmnhost (host time of an eager ATMN
# call, piece by piece), atmnprofile (host vs device time of one eager ATMN call), conv (the
# mixer's causal conv kernels against the PyTorch path, with a backward tile sweep), scaling /
# scalingfsdp (Stage-2 DDP / FSDP2 scaling over NPROCS="1 2 4 8" processes; the default teacher needs
# its GGUF parts, see benchmarks/README.md; TEACHER=benchmarks/smollm2_135m_config.json takes its
# shapes with random weights instead), stage2prof (where a Stage-2 training step spends its time; a
# teacher of SmolLM2-135M's shapes with random weights).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
STAGES=${STAGES:-"tests atmn"}
TEACHER=${TEACHER:-smollm2-135m}  # scaling stages: or benchmarks/smollm2_135m_config.json (its shapes, random weights)
case " $STAGES " in *" scaling "* | *" scalingfsdp "*) [ "$TEACHER" = smollm2-135m ] && NEED_TEACHER=1 ;; esac
NEED_TEACHER=${NEED_TEACHER:-0} source benchmarks/device_env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_info.txt"
for stage in $STAGES; do
  case $stage in
    tests) python3 -P -m pytest -q -p no:cacheprovider tests/test_atmn_kernel.py tests/test_ssm_gpu.py tests/test_sbds_kernel.py tests/test_causal_conv_kernel.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
    gputests) python3 -P -m pytest -q -p no:cacheprovider -rf tests/test_ssm_gpu.py tests/test_atmn_kernel.py tests/test_sbds_kernel.py tests/test_causal_conv_kernel.py -k "gpu or full_size or dtypes_and_shapes or multistep or without_triton or when_forced or sbds or reference or autocast" 2>&1 | tee "$OUT/gpu_tests.log" ;;
    atmntests) NEURO_MAR_FAST_LAUNCH=check python3 -P -m pytest -q -p no:cacheprovider -rf tests/test_atmn_kernel.py tests/test_launch.py 2>&1 | tee "$OUT/atmn_gpu_tests.log" ;;
    atmn) python3 -P benchmarks/atmn.py 2>&1 | tee "$OUT/atmn_bench.log" ;;
    conv) python3 -P benchmarks/causal_conv.py 2>&1 | tee "$OUT/causal_conv.log" ;;
    atmntune) python3 -P benchmarks/atmn_tune.py 2>&1 | tee "$OUT/atmn_tune.log" ;;
    atmnhost) python3 -P benchmarks/atmn_host.py 2>&1 | tee "$OUT/atmn_host.log" ;;
    atmnprofile) for f in once multi; do python3 -P benchmarks/atmn_profile.py --form $f; done 2>&1 | tee "$OUT/atmn_profile.log" ;;
    sbds) python3 -P benchmarks/sbds.py 2>&1 | tee "$OUT/sbds_bench.log" ;;
    gpumark) python3 -P -m pytest -q -p no:cacheprovider -rf -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" ;;
    scaling) python3 -P benchmarks/scaling.py --teacher "$TEACHER" --nprocs ${NPROCS:-1 2} 2>&1 | tee "$OUT/scaling.log" ;;
    scalingfsdp) python3 -P benchmarks/scaling.py --teacher "$TEACHER" --fsdp --nprocs ${NPROCS:-1 2} 2>&1 | tee "$OUT/scaling_fsdp.log" ;;
    stage2prof) python3 -P benchmarks/stage2_profile.py --teacher benchmarks/smollm2_135m_config.json 2>&1 | tee "$OUT/stage2_profile.log" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
