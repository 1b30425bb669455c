"""Measured GPU energy: the NVML total-energy counter read around a real run.

The counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules) updates about every 100 ms,
so measure windows of seconds.
"""
from __future__ import annotations

import time


class NVMLUnavailable(RuntimeError):
    pass


def _nvml():
    try:
        import pynvml  # provided by the nvidia-ml-py package
    except ImportError as err:
        raise NVMLUnavailable("measure mode needs NVIDIA's NVML bindings: pip install nvidia-ml-py") from err
    try:
        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - no driver / no GPU
        raise NVMLUnavailable(f"measure mode needs an NVIDIA GPU and driver (NVML init failed: {err}); "
                              "on a CPU machine use the estimated targets instead") from None
    return pynvml


def measure_energy(fn, tokens: int, device_index: int = 0, min_seconds: float = 3.0) -> dict:
    """Run ``fn()`` repeatedly for at least ``min_seconds`` and return board energy per token
    (joules), average power (W) and tokens/s from the NVML counter. ``tokens`` = tokens per call."""
    import torch

    if not torch.cuda.is_available():
        raise NVMLUnavailable("measure mode needs a CUDA GPU; this machine has none")
    nv = _nvml()
    handle = nv.nvmlDeviceGetHandleByIndex(device_index)
    fn()
    torch.cuda.synchronize()
    e0 = nv.nvmlDeviceGetTotalEnergyConsumption(handle)
    t0 = time.perf_counter()
    calls = 0
    while True:
        fn()
        calls += 1
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= min_seconds:
            break
    dt = time.perf_counter() - t0
    joules = (nv.nvmlDeviceGetTotalEnergyConsumption(handle) - e0) / 1000.0
    return {"J_per_token": joules / (calls * tokens), "watts": joules / dt, "tokens_per_s": calls * tokens / dt,
            "seconds": dt, "calls": calls}
