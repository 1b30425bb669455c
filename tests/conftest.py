"""Test configuration: NaN-poisoned new tensors, deterministic seeds."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # kernel tests run Triton kernels on CPU tensors through the interpreter; must precede any
    # import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def nan_poison(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled floating tensors, so a fast path that
    reads memory it never wrote fails loudly (fla's conftest does the same)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield
