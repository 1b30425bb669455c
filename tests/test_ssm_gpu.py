"""mamba_ssm's Triton SSD kernels == the PyTorch chunked scan (run on a GPU: pytest -m gpu)."""
import pytest
import torch

from neuro_mar.ssm import load_mamba_chunk_scan, mamba_unavailable_reason, ssd_chunked, ssd_scan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _need_mamba():
    if load_mamba_chunk_scan() is None:
        pytest.skip(f"mamba_ssm not importable: {mamba_unavailable_reason()}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("l", [1, 63, 257, 2048])
@pytest.mark.parametrize("with_state", [False, True])
def test_mamba_backend_equals_chunked(dtype, tol, l, with_state):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, p, gr, n = 2, 9, 64, 9, 64
    x = torch.randn(b, l, h, p, device="cuda", generator=g).to(dtype)
    a = -torch.nn.functional.softplus(torch.randn(b, l, h, device="cuda", generator=g) - 3)
    B = (torch.randn(b, l, gr, n, device="cuda", generator=g) / 8).to(dtype)
    C = (torch.randn(b, l, gr, n, device="cuda", generator=g) / 8).to(dtype)
    S0 = torch.randn(b, h, p, n, device="cuda", generator=g) if with_state else None
    ins1 = [t.clone().requires_grad_() for t in (x, a, B, C)]
    ins2 = [t.clone().requires_grad_() for t in (x, a, B, C)]
    y1, s1 = ssd_chunked(*ins1, S0, chunk_size=64)
    y2, s2 = ssd_scan(*ins2, S0, chunk_size=64, backend="mamba_ssm")
    scale = y1.float().abs().max().item()
    torch.testing.assert_close(y2.float(), y1.float(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(s2, s1, rtol=tol, atol=tol * s1.abs().max().item())
    gy = torch.randn_like(y1)
    (y1.float() * gy.float()).sum().backward()
    (y2.float() * gy.float()).sum().backward()
    # mamba's kernel scales x by dt, so the Discrete Mamba-2 form passes x / dt: the two paths of
    # the gradient of log_decay then cancel (exactly in our scan, up to rounding in mamba's, which
    # bf16 amplifies by 1/dt); its tolerance is relative to the largest gradient of the call
    gscale = max(t.grad.float().abs().max().item() for t in ins1)
    for name, t1, t2 in zip("x a B C".split(), ins1, ins2):
        rel = tol * (8 if name == "a" else 4)
        err = (t2.grad.float() - t1.grad.float()).abs().max().item()
        floor = (0.05 if name == "a" else 1e-3) * gscale
        assert err <= rel * max(t1.grad.float().abs().max().item(), floor), (name, err, gscale)
