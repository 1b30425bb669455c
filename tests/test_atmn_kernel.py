"""ATMN Triton kernels == PyTorch reference: spikes exactly, x_hat and every gradient within
tolerance, awkward shapes, all dtypes and surrogates, NaN-poisoned outputs. On CPU the kernels
run under TRITON_INTERPRET=1 (set by conftest); on a GPU at full size with -m gpu."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from neuro_mar.kernels import atmn_ops, atmn_ref  # noqa: E402
from neuro_mar.neurons import ATMN, SpikeSite, resolve_surrogate  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}
SURROGATES = ["sigmoid", "atan", "straight_through", "piecewise_quadratic", "erf"]


def _case(shape, C_scale=1.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * C_scale).to(dtype).to(DEV)
    a = (torch.randn(shape[-1], generator=g) * 0.3).to(DEV)
    return x, a


def _once_both(x, a, T, tau, sg_name, ternary, detach):
    sg = resolve_surrogate(sg_name)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(x.device)
    # the kernel keeps state and accumulation in fp32 whatever the input dtype: so is the reference
    # (for half inputs its own backward would round per-spike gradients to the input dtype)
    x1, a1 = x.float().clone().requires_grad_(), a.clone().requires_grad_()
    xh1, sp1 = atmn_ref.atmn_once_ref(x1, a1, T, tau, sg, ternary, detach)
    (xh1 * gy.float()).sum().backward()
    xh1, sp1, gx1 = xh1.to(x.dtype), sp1.to(x.dtype), x1.grad.to(x.dtype)
    x2, a2 = x.clone().requires_grad_(), a.clone().requires_grad_()
    xh2, sp2, cnt = atmn_ops.atmn_once(x2, a2, T, tau, sg, ternary, detach, write_spikes=True, count=True)
    (xh2.float() * gy.float()).sum().backward()
    return (xh1, sp1, gx1, a1.grad), (xh2, sp2, x2.grad, a2.grad, cnt)


@pytest.mark.parametrize("sg_name", SURROGATES)
@pytest.mark.parametrize("ternary", [True, False])
@pytest.mark.parametrize("detach", [False, True])
def test_once_matches_reference_all_surrogates(sg_name, ternary, detach, nan_poison):
    x, a = _case((3, 37, 45))
    (xh1, sp1, gx1, ga1), (xh2, sp2, gx2, ga2, cnt) = _once_both(x, a, 4, 0.5, sg_name, ternary, detach)
    assert torch.equal(sp2.float(), sp1.float())
    torch.testing.assert_close(xh2, xh1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx2, gx1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga2, ga1, rtol=1e-4, atol=1e-4)
    assert cnt.tolist() == [int((sp1 > 0).sum()), int((sp1 < 0).sum())]


@pytest.mark.parametrize("T", [1, 3, 4, 16, 17])
@pytest.mark.parametrize("tau", [0.5, 1.0, 0.75])
def test_once_matches_reference_T_and_tau(T, tau, nan_poison):
    x, a = _case((129, 67), C_scale=3.0)
    (xh1, sp1, gx1, ga1), (xh2, sp2, gx2, ga2, _) = _once_both(x, a, T, tau, "sigmoid", True, False)
    assert torch.equal(sp2.float(), sp1.float())
    torch.testing.assert_close(xh2, xh1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx2, gx1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ga2, ga1, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (5, 1), (7, 300), (2, 3, 129)])
def test_once_dtypes_and_shapes(dtype, shape, nan_poison):
    x, a = _case(shape, dtype=dtype)
    (xh1, sp1, gx1, ga1), (xh2, sp2, gx2, ga2, _) = _once_both(x, a, 4, 0.5, "atan", True, False)
    assert xh2.dtype == dtype and gx2.dtype == dtype and sp2.dtype == torch.int8
    assert torch.equal(sp2.float(), sp1.float())
    torch.testing.assert_close(xh2, xh1, **TOL[dtype])
    torch.testing.assert_close(gx2, gx1, **TOL[dtype])
    torch.testing.assert_close(ga2, ga1, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("sg_name", SURROGATES)
@pytest.mark.parametrize("ternary", [True, False])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("T", [1, 4])
def test_multistep_matches_reference(sg_name, ternary, detach, T, nan_poison):
    _multistep_case(sg_name, ternary, detach, T, with_v0=True)


@pytest.mark.parametrize("T", [3, 16])  # 3: h recomputed from x in the backward; 16: h saved
@pytest.mark.parametrize("with_v0", [True, False])
def test_multistep_long_T_and_without_state(T, with_v0, nan_poison):
    _multistep_case("sigmoid", True, False, T, with_v0)


def _multistep_case(sg_name, ternary, detach, T, with_v0):
    sg = resolve_surrogate(sg_name)
    x, a = _case((T, 9, 70), C_scale=1.2)
    v0 = torch.randn(9, 70).to(DEV) * 0.5
    gs = torch.randn(T, 9, 70).to(DEV)
    gv = torch.randn(9, 70).to(DEV)
    x1, a1, v1 = x.clone().requires_grad_(), a.clone().requires_grad_(), v0.clone().requires_grad_()
    s1, u1 = atmn_ref.atmn_multistep_ref(x1, a1, 0.5, sg, ternary, detach, v0=v1 if with_v0 else None)
    ((s1 * gs).sum() + (u1 * gv).sum()).backward()
    x2, a2, v2 = x.clone().requires_grad_(), a.clone().requires_grad_(), v0.clone().requires_grad_()
    s2, u2 = atmn_ops.atmn_multistep(x2, a2, 0.5, sg, ternary, detach, v0=v2 if with_v0 else None)
    ((s2 * gs).sum() + (u2 * gv).sum()).backward()
    assert torch.equal(s1, s2)
    torch.testing.assert_close(u2, u1, rtol=1e-6, atol=1e-6)
    # the adjoint grows by 1/tau per step back (2^15 at T = 16): compare relative to its largest value
    scale = x1.grad.abs().max().item()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6 * scale)
    if with_v0:
        torch.testing.assert_close(v2.grad, v1.grad, rtol=1e-5, atol=1e-6 * scale)
    else:
        assert v2.grad is None
    torch.testing.assert_close(a2.grad, a1.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sg_name", ["sigmoid", "atan"])
@pytest.mark.parametrize("alpha", [1.0, 4.0, 20.0])
def test_ternary_slope_at_extreme_potentials(sg_name, alpha, nan_poison):
    """The one-exponential / one-reciprocal ternary slopes (``_spike_slope``) stay finite and equal
    the two-term reference from far below -V through both thresholds to 1e30."""
    a = torch.zeros(16, device=DEV)
    v = torch.tensor([-1e30, -1e6, -37.0, -1.0 - 1e-6, -1.0, -0.999, -0.5, 0.0, 0.3, 0.999, 1.0, 1.0 + 1e-6,
                      1.7, 37.0, 1e6, 1e30])
    x = torch.cat([v, v * 0.731]).reshape(2, 16).to(DEV)
    sg = resolve_surrogate(sg_name, alpha=alpha)
    for T in (1, 3):
        x1, a1 = x.clone().requires_grad_(), a.clone().requires_grad_()
        xh1, _ = atmn_ref.atmn_once_ref(x1, a1, T, 0.5, sg)
        xh1.sum().backward()
        x2, a2 = x.clone().requires_grad_(), a.clone().requires_grad_()
        xh2, _, _ = atmn_ops.atmn_once(x2, a2, T, 0.5, sg)
        xh2.sum().backward()
        assert torch.isfinite(x2.grad).all() and torch.isfinite(a2.grad).all()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)


def test_kernels_compile_for_hopper():
    """Every launcher's kernel variants compile down to a cubin for sm_90 (no GPU needed): what the
    TRITON_INTERPRET tests cannot show."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "neuro_mar.kernels.compile_check"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    n = __import__("re").search(r"compiled (\d+) kernel variants for sm_90; 0 failed", out.stdout)
    assert n and int(n.group(1)) >= 20, out.stdout  # once/multi fwd+bwd variants and the SBDS rows


def test_compile_check_reports_a_kernel_that_does_not_compile(tmp_path):
    """The compile check fails on what the interpreter accepts: a tuple indexed by a runtime loop
    variable (legal Python, not legal Triton)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    code = (
        "import torch, triton, triton.language as tl\n"
        "from triton.runtime.jit import JITFunction\n"
        "from neuro_mar.kernels.compile_check import _Compiler\n"
        "@triton.jit\n"
        "def bad(X, n, B: tl.constexpr):\n"
        "    xs = (tl.load(X + tl.arange(0, B)), tl.load(X + B + tl.arange(0, B)))\n"
        "    for i in range(n):\n"
        "        tl.store(X + tl.arange(0, B), xs[i])\n"
        "@triton.jit\n"
        "def good(X, n, B: tl.constexpr):\n"
        "    xs = (tl.load(X + tl.arange(0, B)), tl.load(X + B + tl.arange(0, B)))\n"
        "    for i in tl.static_range(2):\n"
        "        tl.store(X + tl.arange(0, B), xs[i])\n"
        "c = _Compiler(90)\n"
        "c(good, torch.zeros(64), 2, B=32)\n"
        "print('compiled', len(c.done))\n"
        "try:\n"
        "    c(bad, torch.zeros(64), 2, B=32)\n"
        "except Exception as err:\n"
        "    print('refused', type(err).__name__)\n"
        "else:\n"
        "    print('compiled')\n"
    )
    (tmp_path / "bad_kernel.py").write_text(code)  # @triton.jit needs its source in a file
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(tmp_path / "bad_kernel.py")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert "compiled 1\nrefused CompilationError" in out.stdout, out.stdout + out.stderr[-3000:]


@pytest.mark.parametrize("use", ["spikes", "v_last"])
def test_multistep_one_output_used(use, nan_poison):
    """Only one output reaches the loss: the other's gradient is absent (not zero-filled), and the
    gradients still equal the reference's."""
    sg = resolve_surrogate("sigmoid")
    x, a = _case((4, 5, 70))
    grads = []
    for fn in (atmn_ref.atmn_multistep_ref, atmn_ops.atmn_multistep):
        xi, ai = x.clone().requires_grad_(), a.clone().requires_grad_()
        s, u = fn(xi, ai, 0.5, sg)
        out = s if use == "spikes" else u
        (out * torch.linspace(-1, 1, out.numel(), device=DEV).reshape(out.shape)).sum().backward()
        grads.append((xi.grad, ai.grad))
    scale = grads[0][0].abs().max().item()  # as in _multistep_case: the adjoint grows by 1/tau per step back
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-4)


def test_multistep_bf16():
    sg = resolve_surrogate("sigmoid")
    x, a = _case((4, 6, 50), dtype=torch.bfloat16)
    s1, _ = atmn_ref.atmn_multistep_ref(x, a, 0.5, sg)
    s2, _ = atmn_ops.atmn_multistep(x, a, 0.5, sg)
    assert s2.dtype == torch.bfloat16 and torch.equal(s1, s2)


def test_neuron_and_site_use_kernel_when_forced(monkeypatch):
    """The module-level paths (SpikeSite, ATMN multi-step mode) give the same results through the
    kernel as through PyTorch."""
    n = ATMN(channels=40).to(DEV)
    site = SpikeSite(n)
    x = (torch.randn(6, 40) * 2).to(DEV)
    monkeypatch.setattr(atmn_ops._backend, "value", "torch")
    y_ref = site(x)
    ref_stats = site.stats()
    site.reset_counters()
    seq = (torch.randn(4, 6, 40) * 2).to(DEV)
    n.step_mode = "m"
    s_ref = n(seq)
    n.reset()
    monkeypatch.setattr(atmn_ops._backend, "value", "triton")
    n.step_mode = "s"
    torch.testing.assert_close(site(x), y_ref)
    assert site.stats() == ref_stats
    n.step_mode = "m"
    assert torch.equal(n(seq), s_ref)


def test_backend_knob_errors(monkeypatch):
    monkeypatch.setattr(atmn_ops._backend, "value", "triton")
    with pytest.raises(ValueError, match="no kernel"):
        atmn_ops.use_kernel(torch.zeros(2), resolve_surrogate("soft_sign"))
    with pytest.raises(ValueError, match="backend"):
        atmn_ops.set_backend("cuda")


def test_torch_compile_traces_the_custom_op():
    sg = resolve_surrogate("sigmoid")
    x, a = _case((8, 33))
    a = a.requires_grad_()

    def f(x, a):
        y, _, _ = atmn_ops.atmn_once(x, a, 4, 0.5, sg)
        return (y * y).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1 = x.clone().requires_grad_()
    compiled(x1, a).backward()
    x2 = x.clone().requires_grad_()
    a2 = a.detach().clone().requires_grad_()
    f(x2, a2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_torch_compile_traces_the_multistep_op():
    sg = resolve_surrogate("sigmoid")
    x, a = _case((4, 8, 33))

    def f(x, a):
        s, v = atmn_ops.atmn_multistep(x, a, 0.5, sg)
        return (s * x).sum() + v.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, a1 = x.clone().requires_grad_(), a.clone().requires_grad_()
    compiled(x1, a1).backward()
    x2, a2 = x.clone().requires_grad_(), a.clone().requires_grad_()
    f(x2, a2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(a1.grad, a2.grad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cpu_path_never_touches_the_kernels(monkeypatch):
    def boom():
        raise AssertionError("the Triton kernels were called on the CPU path")

    monkeypatch.setattr(atmn_ops._backend, "value", "auto")
    monkeypatch.setattr(atmn_ops, "_kernels", boom)
    site = SpikeSite(ATMN(channels=8))
    x = torch.randn(3, 8, requires_grad=True)
    site(x).sum().backward()
    n = ATMN(channels=8, step_mode="m")
    n(torch.randn(4, 3, 8)).sum()


def test_import_and_cpu_path_without_triton():
    """With triton unimportable, neuro_mar imports and ATMN runs (and the kernel module never loads)."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # makes `import triton` fail\n"
        "import torch, neuro_mar\n"
        "from neuro_mar.neurons import SpikeSite, create\n"
        "site = SpikeSite(create('atmn', channels=8))\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "site(x).sum().backward()\n"
        "assert 'neuro_mar.kernels.atmn' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_kernels_folder_imported_as_top_level_package_stays_empty():
    """transformers imports a top-level ``kernels`` to ask whether Hugging Face's package is there;
    from the repository root that finds this folder. It must not register the custom ops a second
    time or import neuro_mar half-way through transformers' own import (a circular import that
    failed every transformers-using script started with the root on sys.path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import kernels, transformers.modeling_utils, neuro_mar.kernels\n"
            "assert not hasattr(kernels, 'atmn_ops') and neuro_mar.kernels.atmn_ops is not None\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "assert not is_kernels_available()\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [4, 8])
def test_full_size_on_gpu(dtype, T):
    x, a = _case((1 << 15, 1024), dtype=dtype)
    (xh1, sp1, gx1, ga1), (xh2, sp2, gx2, ga2, cnt) = _once_both(x, a, T, 0.5, "sigmoid", True, False)
    assert torch.equal(sp2.float(), sp1.float())
    torch.testing.assert_close(xh2, xh1, **TOL[dtype])
    torch.testing.assert_close(gx2, gx1, **TOL[dtype])
    torch.testing.assert_close(ga2, ga1, rtol=1e-3, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("T", [4, 16])
def test_multistep_full_size_on_gpu(T):
    sg = resolve_surrogate("sigmoid")
    x, a = _case((T, 1 << 13, 1024))
    gs = torch.randn_like(x)
    x1, a1 = x.clone().requires_grad_(), a.clone().requires_grad_()
    s1, _ = atmn_ref.atmn_multistep_ref(x1, a1, 0.5, sg)
    (s1 * gs).sum().backward()
    x2, a2 = x.clone().requires_grad_(), a.clone().requires_grad_()
    s2, _ = atmn_ops.atmn_multistep(x2, a2, 0.5, sg)
    (s2 * gs).sum().backward()
    assert torch.equal(s1, s2)
    scale = x1.grad.abs().max().item()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(a2.grad, a1.grad, rtol=1e-3, atol=1e-5 * a1.grad.abs().max().item())


def test_tile_geometry_covers_every_channel_with_little_padding():
    """Each kernel's tile: power-of-two channels within its max_cols, at most 1/8 of a row's lanes
    masked off unless the tile is already down to 32 channels; the grid covers every row and channel."""
    from neuro_mar.kernels import atmn

    for kernel, tile in atmn.TILES.items():
        for C in [1, 3, 31, 45, 96, 300, 576, 1000, 1024, 1536, 2049, 49152]:
            for R in [1, 7, 4096]:
                BR, BC, grid, warps = atmn._geometry(kernel, R, C)
                assert BC & (BC - 1) == 0 and BR & (BR - 1) == 0 and BC <= max(tile["max_cols"], 1)
                assert grid[0] * BR >= R > (grid[0] - 1) * BR and grid[1] * BC >= C > (grid[1] - 1) * BC
                assert (grid[1] * BC - C) * 8 <= C or BC <= 32 or BC == 1 << (C - 1).bit_length()
                assert warps == tile["num_warps"] and BR * BC <= max(tile["elems"], BC)
