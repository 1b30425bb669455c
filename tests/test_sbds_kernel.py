"""Fused linear SBDS == the PyTorch reference in loss and both student gradients (CPU under
TRITON_INTERPRET=1; GPU at full size with -m gpu)."""
import pytest
import torch

pytest.importorskip("triton")

from neuro_mar.kernels.sbds import chunked_linear_sbds, fused_linear_sbds  # noqa: E402
from neuro_mar.kernels.sbds_ref import linear_sbds_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(N, Hs, Ht, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (mk(N, Hs).to(dtype).to(DEV), (mk(V, Hs) / Hs**0.5 * 3).to(dtype).to(DEV),
            mk(N, Ht).to(dtype).to(DEV), (mk(V, Ht) / Ht**0.5 * 3).to(dtype).to(DEV))


def _both(h_s, W_s, h_t, W_t, alpha, beta, T, mask=None, teacher_logits=False, chunk=None):
    a1, b1 = h_s.clone().float().requires_grad_(), W_s.clone().float().requires_grad_()
    ref = linear_sbds_ref(a1, b1, h_t.float(), W_t.float(), alpha=alpha, beta=beta, temperature=T, mask=mask)
    ref.backward()
    a2, b2 = h_s.clone().requires_grad_(), W_s.clone().requires_grad_()
    if teacher_logits:
        out = fused_linear_sbds(a2, b2, teacher_logits=(h_t @ W_t.t()), alpha=alpha, beta=beta, temperature=T,
                                mask=mask, chunk=chunk)
    else:
        out = fused_linear_sbds(a2, b2, h_t, W_t, alpha=alpha, beta=beta, temperature=T, mask=mask, chunk=chunk)
    (out * 1.5).backward()
    return (ref, a1.grad * 1.5, b1.grad * 1.5), (out, a2.grad, b2.grad)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.0, 1.0), (0.2, 0.7)])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_matches_reference_odd_shapes(alpha, beta, T, nan_poison):
    h_s, W_s, h_t, W_t = _case(423, 167, 96, 1423, torch.float32)
    (r, ga, gb), (o, fa, fb) = _both(h_s, W_s, h_t, W_t, alpha, beta, T, chunk=100)
    torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fa, ga, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fb, gb, rtol=1e-4, atol=1e-6)


def test_mask_and_teacher_logits(nan_poison):
    h_s, W_s, h_t, W_t = _case(97, 33, 33, 300, torch.float32)
    mask = torch.rand(97, generator=torch.Generator().manual_seed(1)) > 0.3
    (r, ga, gb), (o, fa, fb) = _both(h_s, W_s, h_t, W_t, 0.2, 0.7, 1.0, mask=mask.to(DEV), teacher_logits=True, chunk=32)
    torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fa, ga, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fb, gb, rtol=1e-4, atol=1e-6)
    assert torch.all(fa[~mask.to(DEV)] == 0)


def test_bf16_inputs():
    h_s, W_s, h_t, W_t = _case(64, 48, 40, 777, torch.bfloat16)
    (r, ga, gb), (o, fa, fb) = _both(h_s, W_s, h_t, W_t, 0.2, 0.7, 1.0, chunk=16)
    assert fa.dtype == torch.bfloat16 and fb.dtype == torch.bfloat16
    torch.testing.assert_close(o, r, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(fa.float(), ga, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(fb.float(), gb, rtol=5e-2, atol=5e-3)


def test_chunked_compile_baseline_matches_reference():
    h_s, W_s, h_t, W_t = _case(50, 16, 16, 120, torch.float32)
    a1, b1 = h_s.clone().requires_grad_(), W_s.clone().requires_grad_()
    ref = linear_sbds_ref(a1, b1, h_t, W_t)
    ref.backward()
    loss, dh, dW = chunked_linear_sbds(h_s, W_s, h_t, W_t, chunk=16, compile=False)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(dh, a1.grad)
    torch.testing.assert_close(dW, b1.grad)


def test_errors():
    h_s, W_s, h_t, W_t = _case(4, 8, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="either"):
        fused_linear_sbds(h_s, W_s)
    with pytest.raises(ValueError, match="mask"):
        fused_linear_sbds(h_s, W_s, h_t, W_t, mask=torch.zeros(4, dtype=torch.bool, device=DEV))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_size_on_gpu():
    h_s, W_s, h_t, W_t = _case(8192, 576, 576, 49152, torch.bfloat16)
    (r, ga, gb), (o, fa, fb) = _both(h_s, W_s, h_t, W_t, 0.2, 0.7, 1.0)
    torch.testing.assert_close(o, r, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(fa.float(), ga, rtol=5e-2, atol=5e-4)
    torch.testing.assert_close(fb.float(), gb, rtol=5e-2, atol=5e-4)


def test_stage2_loss_uses_the_fused_op_when_asked(monkeypatch):
    """The Stage-2 loss through the fused kernel equals the reference path (loss and gradients)."""
    from neuro_mar.convert import llama_to_mar
    from neuro_mar.kernels import atmn_ops
    from neuro_mar.refine import RefineConfig
    from neuro_mar.refine.pipeline import make_loss_2
    from tiny import tiny_llama

    t = tiny_llama()
    s1 = llama_to_mar(t).requires_grad_(False).to(DEV)  # forced Triton needs CUDA tensors on a GPU machine
    st = llama_to_mar(t).to(DEV)
    ids = torch.randint(3, 97, (2, 9)).to(DEV)
    fn = make_loss_2(RefineConfig(gamma=0.1))
    monkeypatch.setattr(atmn_ops._backend, "value", "torch")
    ref = fn(st, s1, ids)
    ref.backward()
    g_ref = st.lm_head.weight.grad.clone()
    st.zero_grad()
    monkeypatch.setattr(atmn_ops._backend, "value", "triton")
    out = fn(st, s1, ids)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.lm_head.weight.grad, g_ref, rtol=1e-4, atol=1e-6)


def test_autocast_fp32_weights_keep_fp32_weight_gradient():
    """Training runs fp32 master weights under bf16 autocast: the matmuls run in bf16, the weight's
    gradient accumulates in fp32 and comes back fp32."""
    h_s, W_s, h_t, W_t = _case(96, 40, 24, 500, torch.float32)
    a1, b1 = h_s.clone().requires_grad_(), W_s.clone().requires_grad_()
    linear_sbds_ref(a1, b1, h_t, W_t).backward()
    a2, b2 = h_s.clone().requires_grad_(), W_s.clone().requires_grad_()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = fused_linear_sbds(a2, b2, h_t, W_t, chunk=32)
    out.backward()
    assert b2.grad.dtype == torch.float32 and a2.grad.dtype == torch.float32
    torch.testing.assert_close(b2.grad, b1.grad, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(a2.grad, a1.grad, rtol=5e-2, atol=2e-3)


def test_backward_twice_is_refused():
    h_s, W_s, h_t, W_t = _case(8, 8, 8, 20, torch.float32)
    out = fused_linear_sbds(h_s.requires_grad_(), W_s.requires_grad_(), h_t, W_t)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.backward()


def test_vocab_mismatch_is_refused():
    h_s, W_s, h_t, W_t = _case(8, 8, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="words"):
        fused_linear_sbds(h_s, W_s, h_t, W_t[:-1])
