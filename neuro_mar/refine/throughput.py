"""Stage-2 training throughput with the project's fast paths against the PyTorch reference paths.

The same trainer runs the same Stage-2 steps (same model copy, batch and loss) twice:

* ``fused``: ATMN through the Triton kernels, SBDS through the fused linear loss, the SSM scan
  through mamba_ssm's Triton SSD where importable (the backends' ``auto``);
* ``reference``: ATMN in PyTorch, SBDS on materialised logits, the chunked PyTorch scan.

Tokens/s is the median over the timed steps (the first steps, which compile kernels, are not
timed); peak memory is CUDA's high-water mark during the run.
"""
from __future__ import annotations

import contextlib
import copy
import statistics

import torch

from .trainer import TrainConfig, Trainer

WARMUP_STEPS = 2
MODES = {"fused": ("auto", "auto"), "reference": ("torch", "chunked")}


@contextlib.contextmanager
def backends(mode: str):
    """Set the ATMN/SBDS kernel backend and the SSM scan backend for ``mode`` (see MODES)."""
    from ..kernels import atmn_ops
    from ..ssm import backends as ssm_backends

    kern, scan = MODES[mode]
    old = (atmn_ops.get_backend(), ssm_backends.default_backend())
    atmn_ops.set_backend(kern)
    ssm_backends.set_default_backend(scan)
    try:
        yield
    finally:
        atmn_ops.set_backend(old[0])
        ssm_backends.set_default_backend(old[1])


def stage2_throughput(cfg, teacher, student, rows: torch.Tensor, device, loss_fn) -> dict:
    """``{"fused": {...}, "reference": {...}, "speedup": x}`` for ``cfg.throughput_steps`` timed
    steps at ``cfg.throughput_micro_batch`` sequences of ``rows.shape[1]`` tokens."""
    from .pipeline import _Bound

    mb = min(cfg.throughput_micro_batch, rows.shape[0])
    out = {"micro_batch": mb, "seq_len": int(rows.shape[1]), "timed_steps": cfg.throughput_steps}
    for mode in MODES:
        model = copy.deepcopy(student).requires_grad_(True)
        tcfg = TrainConfig(steps=cfg.throughput_steps + WARMUP_STEPS, lr=cfg.lr_2, warmup=0, micro_batch=mb,
                           seed=cfg.seed, ckpt_every=10**9)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trainer = None
        try:
            with backends(mode):
                trainer = Trainer(_Bound(model, teacher, loss_fn), lambda m, b: m(b), rows, tcfg, None,
                                  f"throughput-{mode}", progress=False, device=device)
                hist = trainer.run()
            rates = [r["tokens_per_s"] for r in hist[WARMUP_STEPS:]]
            out[mode] = {"tokens_per_s": statistics.median(rates),
                         "seconds_per_step": statistics.median(r["seconds"] for r in hist[WARMUP_STEPS:]),
                         "final_loss": hist[-1]["loss"]}
            if device.type == "cuda":
                out[mode]["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError:
            out[mode] = {"error": f"out of memory at micro-batch {mb}"}
        finally:
            del model, trainer  # the trainer holds the model and its optimizer state
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "tokens_per_s" in out["fused"] and "tokens_per_s" in out["reference"]:
        out["speedup"] = out["fused"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    return out
