"""Choosing the scan: PyTorch reference paths everywhere, mamba_ssm's Triton SSD on CUDA.

``mamba_ssm`` is optional and GPU-only here: its package ``__init__`` imports a compiled CUDA
extension (``selective_scan_cuda``) that a pure-Python install lacks, while its Triton SSD kernels
(``mamba_ssm.ops.triton.ssd_combined``) need none. :func:`load_mamba_chunk_scan` imports just
those, without running the package ``__init__`` when the normal import fails.

The backend is chosen per call: ``"auto"`` (mamba_ssm on CUDA when importable, else chunked),
``"chunked"``, ``"naive"`` or ``"mamba_ssm"`` (forced: an error if unavailable). The default comes
from the environment variable ``NEURO_MAR_SSM_BACKEND`` or :func:`set_default_backend`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch

from ..knobs import Knob
from .scan import ssd_chunked, ssd_naive

BACKENDS = ("auto", "chunked", "naive", "mamba_ssm")
_default = Knob("SSM backend", "NEURO_MAR_SSM_BACKEND", BACKENDS, "auto")
_mamba_fn = None
_mamba_error: str | None = None

MAMBA_INSTALL_HINT = (
    "mamba_ssm's Triton SSD kernels are not importable. On a CUDA machine install the Python parts: "
    "MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation --no-deps "
    "mamba-ssm==2.3.2.post1 einops"
)


def set_default_backend(name: str) -> None:
    """Set the process-wide default scan backend (one of BACKENDS)."""
    _default.set(name)


def default_backend() -> str:
    return _default.value


def load_mamba_chunk_scan():
    """Return ``mamba_chunk_scan_combined`` or None (reason in :func:`mamba_unavailable_reason`)."""
    global _mamba_fn, _mamba_error
    if _mamba_fn is not None or _mamba_error is not None:
        return _mamba_fn
    try:
        try:
            mod = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        except ImportError:
            spec = importlib.util.find_spec("mamba_ssm")
            if spec is None or not spec.submodule_search_locations:
                raise
            # the package __init__ needs compiled CUDA extensions; import only the Triton ops
            for name in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
                del sys.modules[name]
            pkg = types.ModuleType("mamba_ssm")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["mamba_ssm"] = pkg
            mod = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        _mamba_fn = mod.mamba_chunk_scan_combined
    except Exception as err:  # noqa: BLE001 - any failure means "not available", with the reason kept
        _mamba_error = f"{type(err).__name__}: {err}"
    return _mamba_fn


def mamba_unavailable_reason() -> str | None:
    load_mamba_chunk_scan()
    return _mamba_error


def _mamba_scan(x, log_decay, B, C, initial_state, chunk_size):
    fn = load_mamba_chunk_scan()
    if fn is None:
        raise RuntimeError(f"{MAMBA_INSTALL_HINT} ({_mamba_error})")
    if not x.is_cuda:
        raise RuntimeError("the mamba_ssm backend needs CUDA tensors; use backend='chunked' on CPU")
    dt = (-log_decay).float()
    # mamba's recurrence is S = exp(dt*A) S + dt * x B^T; with A = -1 and x / dt it is ours
    heads = x.shape[2]
    A = -torch.ones(heads, device=x.device, dtype=torch.float32)
    # fp32 division; a masked position has dt = 0 and x = 0, and must give 0, not 0 / 0
    y, final = fn((x / dt.clamp_min(1e-30).unsqueeze(-1)).to(x.dtype), dt, A, B, C, chunk_size=max(16, chunk_size),
                  initial_states=None if initial_state is None else initial_state.float(),
                  dt_softplus=False, return_final_states=True)
    return y.to(x.dtype), final.float()


def resolve_backend(name: str | None, device: torch.device) -> str:
    name = name or _default.value
    if name not in BACKENDS:
        raise ValueError(f"unknown SSM backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        return "mamba_ssm" if device.type == "cuda" and load_mamba_chunk_scan() is not None else "chunked"
    return name


def ssd_scan(x, log_decay, B, C, initial_state=None, chunk_size: int = 64, backend: str | None = None):
    """Dispatch to the chosen scan; returns ``(y, final_state)``. See :mod:`neuro_mar.ssm.scan`."""
    name = resolve_backend(backend, x.device)
    if name == "naive":
        return ssd_naive(x, log_decay, B, C, initial_state)
    if name == "mamba_ssm":
        return _mamba_scan(x, log_decay, B, C, initial_state, chunk_size)
    return ssd_chunked(x, log_decay, B, C, initial_state, chunk_size)
