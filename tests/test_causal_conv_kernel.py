"""Causal depthwise conv + SiLU Triton kernels == PyTorch reference: output, conv window and every
gradient (x, weight, bias), awkward shapes and kernel sizes, strided inputs, half dtypes,
NaN-poisoned outputs, several time tiles per backward program; and the mixer with the kernel ==
the mixer without. On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest)."""
import pytest
import torch

pytest.importorskip("triton")

from neuro_mar.kernels import atmn_ops, causal_conv_ops  # noqa: E402
from neuro_mar.kernels.causal_conv_ref import causal_conv1d_silu_ref  # noqa: E402
from neuro_mar.ssm import DiscreteMamba2  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(atmn_ops._backend, "value", "triton")


def _case(b, l, C, K, dtype=torch.float32, bias=True, wide=0, seed=0):
    """x [b, l, C] (a column slice of a [b, l, C + wide] tensor when wide), weight [C, 1, K], bias."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, l, C + wide, generator=g).to(dtype).to(DEV)
    x = base[..., wide // 2: wide // 2 + C]
    w = (torch.randn(C, 1, K, generator=g) / K**0.5).to(DEV)
    bs = (torch.randn(C, generator=g) * 0.1).to(DEV) if bias else None
    return x, w, bs


def _both(x, w, bias):
    """(reference, kernel) results: (y, dx, dw, db); the reference in fp32 from the same inputs and the
    same output gradient (representable in x's dtype, as the kernel receives it)."""
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).float().to(x.device)
    out = []
    for kernel in (False, True):
        xi = (x if kernel else x.float()).detach().clone().requires_grad_()
        wi = w.detach().clone().requires_grad_()
        bi = None if bias is None else bias.detach().clone().requires_grad_()
        y = causal_conv_ops.causal_conv1d_silu(xi, wi, bi) if kernel else causal_conv1d_silu_ref(xi, wi, bi)[0]
        (y.float() * gy).sum().backward()
        out.append((y.to(x.dtype), xi.grad.to(x.dtype), wi.grad, None if bi is None else bi.grad))
    return out


@pytest.mark.parametrize("shape", [(2, 1, 3), (2, 3, 7), (3, 37, 45), (1, 70, 200), (2, 129, 33)])
@pytest.mark.parametrize("K", [1, 2, 4, 5])
def test_kernel_matches_reference_shapes_and_kernel_sizes(shape, K, forced, nan_poison):
    x, w, b = _case(*shape, K)
    (y1, dx1, dw1, db1), (y2, dx2, dw2, db2) = _both(x, w, b)
    assert y2.is_contiguous() and y2.dtype == x.dtype
    torch.testing.assert_close(y2, y1, **TOL[torch.float32])
    torch.testing.assert_close(dx2, dx1, **TOL[torch.float32])
    torch.testing.assert_close(dw2, dw1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db2, db1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_strided_input_dtypes_and_no_bias(dtype, bias, forced, nan_poison):
    x, w, b = _case(2, 45, 40, 4, dtype=dtype, bias=bias, wide=9)
    assert x.stride(1) == 49 and not x.is_contiguous()
    (y1, dx1, dw1, db1), (y2, dx2, dw2, db2) = _both(x, w, b)
    torch.testing.assert_close(y2, y1, **TOL[dtype])
    torch.testing.assert_close(dx2, dx1, **TOL[dtype])
    scale = dw1.abs().max().item()
    torch.testing.assert_close(dw2, dw1, rtol=1e-3, atol=1e-4 * scale)
    assert (db2 is None) == (not bias)
    if bias:
        torch.testing.assert_close(db2, db1, rtol=1e-3, atol=1e-4 * db1.abs().max().item())


def test_backward_with_several_time_tiles_per_program(forced, nan_poison, monkeypatch):
    """MAX_LOOP = 8 and MIN_PROGRAMS = 1 make every backward program loop over 8 time tiles, the last ones
    past the sequence's end: the weight and bias partials must still count each time step once."""
    from neuro_mar.kernels import causal_conv

    monkeypatch.setattr(causal_conv, "MIN_PROGRAMS", 1)
    monkeypatch.setattr(causal_conv, "MAX_LOOP", 8)
    monkeypatch.setitem(causal_conv.TILES, "bwd", {"rows": 4, "cols": 16, "num_warps": 4})
    x, w, b = _case(2, 45, 20, 4)
    (y1, dx1, dw1, db1), (y2, dx2, dw2, db2) = _both(x, w, b)
    torch.testing.assert_close(dx2, dx1, **TOL[torch.float32])
    torch.testing.assert_close(dw2, dw1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db2, db1, rtol=1e-4, atol=1e-4)


def test_torch_compile_traces_the_custom_ops(forced):
    """Under torch.compile (fullgraph) the custom ops and their fake implementations are traced; the
    compiled forward and backward equal eager's."""
    x, w, b = _case(2, 9, 12, 4, wide=4)

    def f(x, w, b):
        return causal_conv_ops.causal_conv1d_silu(x, w, b).pow(2).sum()

    grads = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
        fn(xi, wi, bi).backward()
        grads.append((xi.grad, wi.grad, bi.grad))
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2)


def test_rejects_wrong_shapes():
    x, w, b = _case(2, 5, 6, 4)
    with pytest.raises(ValueError, match=r"weight \[C, 1, K\]"):
        causal_conv_ops.causal_conv1d_silu(x, w[:5], b)
    with pytest.raises(ValueError, match=r"x \[b, l, C\]"):
        causal_conv_ops.causal_conv1d_silu(x[0], w, b)


def test_backend_knob_and_dtypes(monkeypatch):
    """torch: never; triton: forced, but fp64 (which the kernels do not compute in) keeps the
    reference; auto: only CUDA tensors."""
    x, _, _ = _case(1, 4, 8, 4)
    monkeypatch.setattr(atmn_ops._backend, "value", "torch")
    assert not causal_conv_ops.use_conv_kernel(x)
    monkeypatch.setattr(atmn_ops._backend, "value", "triton")
    assert causal_conv_ops.use_conv_kernel(x) and not causal_conv_ops.use_conv_kernel(x.double())
    monkeypatch.setattr(atmn_ops._backend, "value", "auto")
    assert causal_conv_ops.use_conv_kernel(x) == x.is_cuda


@pytest.mark.parametrize("l", [2, 3, 19])
def test_mixer_with_kernel_equals_mixer_without(l, monkeypatch):
    """Output, the conv window a next call continues from, and every gradient; l = 2 < d_conv - 1
    exercises the zero-padded window. A continued call (state given) takes the reference path."""
    torch.manual_seed(0)
    m = DiscreteMamba2(d_model=16, d_state=4, n_qk_heads=2, n_v_heads=4, chunk_size=8).to(DEV)
    u = torch.randn(2, l, 16, device=DEV)
    res = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(atmn_ops._backend, "value", backend)
        ui = u.clone().requires_grad_()
        out, st = m(ui)
        out2, _ = m(ui[:, -1:], st)
        (out.sum() + out2.pow(2).sum()).backward()
        res[backend] = (out.detach(), st.conv.detach(), st.ssm.detach(), ui.grad,
                        {n: p.grad.clone() for n, p in m.named_parameters()})
        m.zero_grad(set_to_none=True)
    (o1, c1, s1, g1, p1), (o2, c2, s2, g2, p2) = res["torch"], res["triton"]
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    assert torch.equal(c2, c1) and c2.shape == (2, m.conv_dim, 3)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-5)
    for n in p1:
        torch.testing.assert_close(p2[n], p1[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_size_bf16_on_gpu():
    """SmolLM2's mixer shape: xBC a column slice of in_proj's padded output, bf16."""
    x, w, b = _case(4, 1024, 1728, 4, dtype=torch.bfloat16, wide=592)
    (y1, dx1, dw1, db1), (y2, dx2, dw2, db2) = _both(x, w, b)
    torch.testing.assert_close(y2, y1, **TOL[torch.bfloat16])
    torch.testing.assert_close(dx2, dx1, **TOL[torch.bfloat16])
    torch.testing.assert_close(dw2, dw1, rtol=1e-3, atol=1e-3 * dw1.abs().max().item())
    torch.testing.assert_close(db2, db1, rtol=1e-3, atol=1e-3 * db1.abs().max().item())
