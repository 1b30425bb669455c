"""ATMN: the unrolled identity, ternary spikes, input-once == multi-step, gradients."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuro_mar.neurons import ATMN
from spikingjelly.activation_based import surrogate as sj_surrogate


def _neuron(C, T, tau, **kw):
    n = ATMN(channels=C, T=T, tau=tau, **kw).double()
    with torch.no_grad():
        n.a.copy_(torch.randn(C, dtype=torch.float64) * 0.5)
    return n


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 9),
    tau=st.sampled_from([0.5, 1.0, 0.75, 2.0]),
    C=st.integers(1, 7),
    scale=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**16),
    ternary=st.booleans(),
)
def test_unrolled_identity_and_levels(T, tau, C, scale, seed, ternary):
    g = torch.Generator().manual_seed(seed)
    n = _neuron(C, T, tau, ternary=ternary)
    x = torch.randn(5, 3, C, generator=g, dtype=torch.float64) * scale
    s = n.encode(x)
    assert s.shape == (T, *x.shape)
    levels = {-1.0, 0.0, 1.0} if ternary else {0.0, 1.0}
    assert set(s.unique().tolist()) <= levels
    V = n.threshold
    w = torch.tensor([tau**t for t in range(T)], dtype=torch.float64).view(-1, 1, 1, 1)
    u_last = n.residual(x) * V
    recon = V * (w * s).sum(0) + tau ** (T - 1) * u_last
    torch.testing.assert_close(recon, x, rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(n.decode(s), V * (w * s).sum(0))


def test_quantisation_error_bounded_in_range():
    # in the representable range the error is at most one last-step quantum: V * tau^(T-1)
    n = ATMN(channels=16, T=4, tau=0.5)
    x = (torch.rand(1000, 16) * 2 - 1) * n.threshold * n.representable_max() * 0.999
    err = (n.decode(n.encode(x)) - x).abs()
    assert (err <= n.threshold * 0.5**3 + 1e-6).all()


@pytest.mark.parametrize("surrogate", ["sigmoid", "atan", "straight_through", "piecewise_quadratic"])
@pytest.mark.parametrize("ternary", [True, False])
@pytest.mark.parametrize("detach_reset", [False, True])
def test_input_once_equals_multistep_outputs_and_gradients(surrogate, ternary, detach_reset):
    C, T = 6, 5
    n = ATMN(channels=C, T=T, tau=0.5, surrogate=surrogate, ternary=ternary, detach_reset=detach_reset, step_mode="m")
    with torch.no_grad():
        n.a.copy_(torch.randn(C) * 0.3)
    x = torch.randn(3, 4, C) * 2
    gout = torch.randn(T, 3, 4, C)

    x1 = x.clone().requires_grad_()
    s1 = n.encode(x1)
    (s1 * gout).sum().backward()
    gx1, ga1 = x1.grad.clone(), n.a.grad.clone()
    n.a.grad = None

    x2 = x.clone().requires_grad_()
    seq = torch.cat([x2.unsqueeze(0), torch.zeros(T - 1, 3, 4, C)])
    s2 = n(seq)
    (s2 * gout).sum().backward()
    n.reset()
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    torch.testing.assert_close(gx1, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga1, n.a.grad, rtol=1e-5, atol=1e-6)
    assert gx1.abs().sum() > 0 and ga1.abs().sum() > 0


@pytest.mark.parametrize("name,cls", [("sigmoid", sj_surrogate.Sigmoid), ("atan", sj_surrogate.ATan)])
def test_single_step_gradient_matches_surrogate_primitive(name, cls):
    """With T=1 the spiking backward is the derivative of the function in which the Heaviside
    step is replaced by the surrogate's primitive p: checked against central finite differences.
    For x the match is exact; for V the decoding uses the hard spike s where the smooth function
    has p(m), so d/dV differs by exactly s - p(m) per element."""
    C = 5
    n = ATMN(channels=C, T=1, tau=0.5, surrogate=name).double()
    with torch.no_grad():
        n.a.copy_(torch.randn(C, dtype=torch.float64) * 0.3)
    x = (torch.randn(64, C, dtype=torch.float64) * 1.5).requires_grad_()
    n.decode(n.encode(x)).sum().backward()
    smooth = ATMN(channels=C, T=1, tau=0.5, surrogate=cls(spiking=False)).double()
    V = n.threshold.detach()

    def f(xx, VV):  # elementwise smooth decoded output
        smooth.a.data.copy_(VV.log())
        return smooth.decode(smooth.encode(xx))

    eps = 1e-6
    xd = x.detach()
    num_x = (f(xd + eps, V) - f(xd - eps, V)) / (2 * eps)
    torch.testing.assert_close(x.grad, num_x, rtol=1e-6, atol=1e-8)
    num_V = ((f(xd, V + eps) - f(xd, V - eps)) / (2 * eps)).sum(0)
    m = xd / V
    s_hard = (m >= 1).double() - (m <= -1).double()
    p = cls(spiking=False)
    correction = (s_hard - (p(m - 1) - p(-m - 1))).sum(0)
    grad_V = n.a.grad / V  # dL/da = dL/dV * V
    torch.testing.assert_close(grad_V, num_V + correction, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("surrogate_cls", [sj_surrogate.Sigmoid, sj_surrogate.ATan, sj_surrogate.Erf])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_gradcheck_surrogate_defined_function(surrogate_cls, tau):
    """Every gradient path (fire, reset, decode, threshold) of the T-step neuron agrees with
    finite differences of the surrogate-defined (smooth) function, in both forms."""
    C, T = 3, 4
    n = ATMN(channels=C, T=T, tau=tau, surrogate=surrogate_cls(spiking=False), step_mode="m").double()
    x = (torch.randn(2, C, dtype=torch.float64) * 2).requires_grad_()
    a = (torch.randn(C, dtype=torch.float64) * 0.3).requires_grad_()

    def once(x, a):
        return _with_a(n, a, lambda: n.decode(n.encode(x)))

    def multi(x, a):
        seq = torch.cat([x.unsqueeze(0), torch.zeros(T - 1, *x.shape, dtype=x.dtype)])

        def run():
            n.reset()
            out = n.decode(n(seq))
            n.reset()
            return out

        return _with_a(n, a, run)

    assert torch.autograd.gradcheck(once, (x, a), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(multi, (x, a), eps=1e-6, atol=1e-5)


def _with_a(n, a, fn):
    """Evaluate fn with the neuron's log-threshold replaced by the tensor a (keeps the graph)."""
    saved = n._parameters["a"]
    del n._parameters["a"]
    n.a = a
    try:
        return fn()
    finally:
        del n.a
        n._parameters["a"] = saved


def test_gradients_reach_x_and_a():
    n = ATMN(channels=8)
    x = (torch.randn(4, 8) * 2).requires_grad_()
    n.decode(n.encode(x)).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    assert n.a.grad is not None and n.a.grad.abs().sum() > 0 and torch.isfinite(n.a.grad).all()


def test_straight_through_gives_identity_gradient_in_range():
    n = ATMN(channels=4, T=4, tau=0.5, surrogate="straight_through")
    x = ((torch.rand(256, 4) * 2 - 1) * n.representable_max() * 0.95).requires_grad_()
    n.decode(n.encode(x)).sum().backward()
    # exactly 1 unless every micro-step misses the half-threshold window (a set of measure ~0 here)
    assert (x.grad == 1).float().mean() > 0.97


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    n = ATMN(channels=8)
    x = torch.randn(3, 8).to(dtype)
    s = n.encode(x)
    assert s.dtype == dtype
    ref = n.encode(x.float())
    torch.testing.assert_close(s.float(), ref)


def test_calibrate_sets_threshold_from_percentile():
    n = ATMN(channels=3, T=4, tau=0.5)
    x = torch.randn(10000, 3) * torch.tensor([0.1, 1.0, 10.0])
    V = n.calibrate(x, percentile=99.0)
    q = torch.quantile(x.abs(), 0.99, dim=0)
    torch.testing.assert_close(V, q / 1.875, rtol=2e-3, atol=0)
    with pytest.raises(ValueError, match="channels"):
        n.calibrate(torch.randn(5, 4))
    with pytest.raises(ValueError, match="percentile"):
        n.calibrate(x, percentile=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tau"):
        ATMN(tau=0)
    with pytest.raises(ValueError, match="T"):
        ATMN(T=0)
    with pytest.raises(ValueError, match="surrogate"):
        ATMN(surrogate="nope")
    with pytest.raises(ValueError, match="init_threshold"):
        ATMN(init_threshold=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ternary", [True, False])
@pytest.mark.parametrize("T,tau", [(1, 0.5), (4, 0.5), (5, 0.7), (8, 1.0)])
def test_inference_loop_equals_the_reference_bit_for_bit(dtype, ternary, T, tau):
    """The no-autograd loop (atmn_infer) gives the reference's x_hat, spikes and counts exactly, on
    awkward shapes, with NaN and infinite inputs and inputs sitting on the thresholds."""
    from neuro_mar.kernels import atmn_infer, atmn_ref

    g = torch.Generator().manual_seed(T)
    a = torch.randn(37, generator=g) * 0.5
    V = a.exp()
    x = torch.randn(3, 5, 37, generator=g) * 3 * V
    x[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    x[1, 1] = V * tau ** -1  # on a threshold after one reset
    x[2, 2] = -V
    x = x.to(dtype)
    want_hat, want_spikes = atmn_ref.atmn_once_ref(x, a, T, tau, sj_surrogate.Sigmoid(), ternary)
    got_hat, got_spikes, counts = atmn_infer.atmn_once_nograd(x, V, T, tau, ternary, want_spikes=True, count=True)
    assert got_hat.dtype == dtype and got_spikes.dtype == dtype
    torch.testing.assert_close(got_hat, want_hat, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got_spikes, want_spikes)
    assert counts.tolist() == [int((want_spikes > 0).sum()), int((want_spikes < 0).sum())]
    big = torch.randn(4, 20000, generator=g).to(dtype)  # counted from the trace's sums
    _, s, c = atmn_infer.atmn_once_nograd(big, torch.tensor(0.3), 4, 0.5, True, want_spikes=True, count=True)
    assert c.tolist() == [int((s > 0).sum()), int((s < 0).sum())]
    rows = (torch.randn(2, 700, 37, generator=g) * 3 * V).to(dtype)  # in blocks of rows
    want_hat, want_spikes = atmn_ref.atmn_once_ref(rows, a, T, tau, sj_surrogate.Sigmoid(), ternary)
    old = atmn_infer.BLOCK_ELEMENTS
    atmn_infer.BLOCK_ELEMENTS = 500
    try:
        got_hat, got_spikes, counts = atmn_infer.atmn_once_nograd(rows, V, T, tau, ternary, want_spikes=True, count=True)
    finally:
        atmn_infer.BLOCK_ELEMENTS = old
    torch.testing.assert_close(got_hat, want_hat)  # the T-term sum may round in another order: 1 ulp
    assert torch.equal(got_spikes, want_spikes)
    assert counts.tolist() == [int((want_spikes > 0).sum()), int((want_spikes < 0).sum())]


def test_sites_take_the_inference_loop_only_without_autograd(monkeypatch):
    """An ATMN site runs the inference loop under no_grad (or on inputs without grad and a frozen
    threshold), the reference when a gradient is wanted or the backend knob says torch; the
    three give the same outputs and counts."""
    from neuro_mar.kernels import atmn_infer, atmn_ops
    from neuro_mar.neurons import SpikeSite, create

    calls = []
    real = atmn_infer.atmn_once_nograd
    monkeypatch.setattr(atmn_infer, "atmn_once_nograd", lambda *a, **k: calls.append(1) or real(*a, **k))
    site = SpikeSite(create("atmn", channels=8))
    x = torch.randn(2, 3, 8) * 2
    with torch.no_grad():
        lean = site(x)
    assert len(calls) == 1
    lean_stats = site.stats()
    site.reset_counters()
    ref = site(x.clone().requires_grad_(True))
    assert len(calls) == 1 and ref.requires_grad
    assert site.stats() == lean_stats
    torch.testing.assert_close(lean, ref.detach(), rtol=0, atol=0)
    atmn_ops.set_backend("torch")
    try:
        with torch.no_grad():
            torch.testing.assert_close(site(x), lean, rtol=0, atol=0)
    finally:
        atmn_ops.set_backend("auto")
    assert len(calls) == 1
