"""SSD scan: naive recurrence == chunked scan (outputs, final state, every gradient)."""
import pytest
import torch

from neuro_mar.ssm import DiscreteMamba2, MixerState, ssd_chunked, ssd_naive, ssd_scan


def _inputs(b, l, h, p, g, n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    a = -torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen, dtype=dtype))
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype) / n**0.5
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype) / n**0.5
    S0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, a, B, C, S0


@pytest.mark.parametrize("l", [1, 63, 257])
@pytest.mark.parametrize("chunk", [1, 16, 64, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive_outputs_and_gradients(l, chunk, with_state):
    x, a, B, C, S0 = _inputs(2, l, 6, 5, 3, 7)
    ins = [t.clone().requires_grad_() for t in (x, a, B, C, S0)]
    ins2 = [t.clone().requires_grad_() for t in (x, a, B, C, S0)]
    y1, s1 = ssd_naive(*ins[:4], ins[4] if with_state else None)
    y2, s2 = ssd_chunked(*ins2[:4], ins2[4] if with_state else None, chunk_size=chunk)
    torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s1, s2, rtol=1e-9, atol=1e-9)
    gy, gs = torch.randn_like(y1), torch.randn_like(s1)
    ((y1 * gy).sum() + (s1 * gs).sum()).backward()
    ((y2 * gy).sum() + (s2 * gs).sum()).backward()
    names = ["x", "log_decay", "B", "C", "S0"]
    for name, t1, t2 in zip(names, ins, ins2):
        if name == "S0" and not with_state:
            continue
        torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-8, atol=1e-8, msg=f"grad of {name}")


def test_split_sequence_continues_from_state():
    x, a, B, C, _ = _inputs(1, 90, 4, 3, 2, 5)
    y, s = ssd_chunked(x, a, B, C, chunk_size=32)
    y1, s1 = ssd_chunked(x[:, :50], a[:, :50], B[:, :50], C[:, :50], chunk_size=32)
    y2, s2 = ssd_chunked(x[:, 50:], a[:, 50:], B[:, 50:], C[:, 50:], s1, chunk_size=32)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(s2, s)


def test_half_precision_inputs_computed_in_fp32():
    x, a, B, C, _ = _inputs(1, 40, 4, 8, 4, 8, dtype=torch.float32)
    y_ref, _ = ssd_naive(x, a, B, C)
    y, s = ssd_chunked(x.bfloat16(), a, B.bfloat16(), C.bfloat16(), chunk_size=16)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=5e-2, atol=5e-2)


def test_bad_shapes_and_backend():
    x, a, B, C, _ = _inputs(1, 4, 4, 2, 3, 2)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_chunked(x, a, B, C)
    x, a, B, C, _ = _inputs(1, 4, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="backend"):
        ssd_scan(x, a, B, C, backend="nope")
    with pytest.raises(RuntimeError, match="CUDA|mamba"):
        ssd_scan(x, a, B, C, backend="mamba_ssm")


def test_mixer_step_equals_full_forward_and_state_constant_size():
    torch.manual_seed(0)
    m = DiscreteMamba2(d_model=16, d_state=4, n_qk_heads=2, n_v_heads=4, chunk_size=8).double()
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    full, final = m(u)
    st = m.empty_state(2, dtype=torch.float64)
    outs = []
    for t in range(13):
        o, st = m.step(u[:, t], st)
        outs.append(o)
        assert st.ssm.shape == (2, 4, 4, 4) and st.conv.shape == (2, m.conv_dim, 3)
    torch.testing.assert_close(torch.stack(outs, 1), full)
    torch.testing.assert_close(st.ssm, final.ssm)
    # prefill 7 tokens, then continue with the remaining 6 in one call
    o1, s1 = m(u[:, :7])
    o2, _ = m(u[:, 7:], s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), full)


def _mixer_grads(m, u):
    u = u.clone().requires_grad_()
    out, state = m(u)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return out.detach(), state.ssm.detach(), u.grad, grads


@pytest.mark.parametrize("bias", [False, True])
def test_padded_in_proj_gives_the_plain_outputs_and_gradients(monkeypatch, bias):
    """in_proj's output width (16 + 2*2*4) + 16 + 4 = 52 is not a multiple of 8: the padded product (the GPU
    path, forced here on CPU) gives the same output, state and gradients as calling in_proj, and a
    hooked in_proj is still called as a module."""
    import neuro_mar.ssm.discrete_mamba2 as dm

    torch.manual_seed(0)
    m = DiscreteMamba2(d_model=16, d_state=4, n_qk_heads=2, n_v_heads=4, chunk_size=8, bias=bias).double()
    assert m.in_proj.out_features % 8
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    plain = _mixer_grads(m, u)
    calls = []
    monkeypatch.setattr(dm, "PAD_IN_PROJ_ON", ("cpu", "cuda"))
    m.in_proj.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
    _mixer_grads(m, u)
    assert len(calls) == 1  # hooked: called as a module
    m.in_proj._forward_pre_hooks.clear()
    orig = torch.nn.functional.linear
    widths = []
    monkeypatch.setattr(dm.F, "linear", lambda x, w, b=None: widths.append(w.shape[0]) or orig(x, w, b))
    padded = _mixer_grads(m, u)
    assert widths[0] % 8 == 0 and widths[0] > m.in_proj.out_features
    for a, b in zip(plain[:3], padded[:3]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert plain[3].keys() == padded[3].keys()
    for n in plain[3]:
        torch.testing.assert_close(padded[3][n], plain[3][n], rtol=1e-12, atol=1e-12, msg=n)


def test_zoh_input_gain_is_the_normalised_recurrence():
    """input_gain="zoh": S_t = a_t S_{t-1} + (1 - a_t) x_t B_t^T with a_t = exp(-dt_t), written out
    here step by step; the step and continued calls agree and the mixing matrix reproduces y."""
    from neuro_mar.ssm.discrete_mamba2 import mixing_matrix

    torch.manual_seed(1)
    m = DiscreteMamba2(d_model=16, d_state=4, n_qk_heads=2, n_v_heads=4, chunk_size=8, input_gain="zoh").double()
    with torch.no_grad():
        m.D.zero_()
        m.dt_bias.copy_(torch.tensor([-4.0, -1.0, 0.0, 1.5]))
        m.in_proj.weight[-4:].normal_(0, 0.5)  # input-dependent dt
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    y, state = m(u)
    xBC, z, A_log = m._project_in(m.in_site(u))
    xBC, _ = m._conv(xBC, None)
    x, B, C = torch.split(xBC, [m.d_inner, 8, 8], dim=-1)
    x = x.reshape(2, 11, 4, 4)
    B = B.reshape(2, 11, 2, 4).repeat_interleave(2, 2)
    C = C.reshape(2, 11, 2, 4).repeat_interleave(2, 2)
    dt = torch.nn.functional.softplus(A_log + m.dt_bias)
    S = torch.zeros(2, 4, 4, 4, dtype=torch.float64)
    ys = []
    for t in range(11):
        a = torch.exp(-dt[:, t])[..., None, None]
        S = a * S + (1 - a) * x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((S * C[:, t, :, None, :]).sum(-1))
    g = torch.stack(ys, 1).reshape(2, 11, -1) * torch.nn.functional.silu(z + m.z_bias)
    torch.testing.assert_close(y, m.out_proj(m.out_site(g)))
    torch.testing.assert_close(state.ssm, S)
    st = m.empty_state(2, dtype=torch.float64)
    steps = []
    for t in range(11):
        o, st = m.step(u[:, t], st)
        steps.append(o)
    torch.testing.assert_close(torch.stack(steps, 1), y)
    M = mixing_matrix(m, u).double()  # [b, h, t, s], formed in fp32
    y_m = torch.einsum("bhts,bshp->bthp", M, x)
    torch.testing.assert_close(y_m, torch.stack(ys, 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="input_gain"):
        DiscreteMamba2(d_model=16, d_state=4, n_qk_heads=2, n_v_heads=4, input_gain="euler")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_decode_step_equals_the_reference(dtype, tol, bias):
    """One decode step's conv as a dot product with the window equals the convolution reference
    for l = 1 (output and the window it leaves), from a non-zero window."""
    from neuro_mar.kernels.causal_conv_ref import causal_conv1d_silu_ref
    from neuro_mar.ssm.discrete_mamba2 import conv_step_silu

    g = torch.Generator().manual_seed(3)
    C, K = 13, 4
    w = torch.randn(C, 1, K, generator=g).to(dtype)
    b = torch.randn(C, generator=g).to(dtype) if bias else None
    x = torch.randn(2, 1, C, generator=g).to(dtype)
    prev = torch.randn(2, C, K - 1, generator=g).to(dtype)
    want, want_window = causal_conv1d_silu_ref(x, w, b, prev)
    got, window = conv_step_silu(x, w, b, prev)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(window, want_window, rtol=0, atol=0)
