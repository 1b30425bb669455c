"""kernels/launch.py: the cached launch keys what Triton specializes on, takes Triton's own path
where it must (interpreter, knob), and on a GPU launches the same compiled kernel Triton would."""
import pytest
import torch

pytest.importorskip("triton")

from neuro_mar.kernels import atmn_ops, atmn_ref, launch  # noqa: E402
from neuro_mar.neurons import resolve_surrogate  # noqa: E402


class _Param:
    def __init__(self, constexpr):
        self.is_constexpr = constexpr


class _FakeKernel:
    """Stands in for a JITFunction: (X pointer, n int, scale float, BLOCK constexpr)."""
    __name__ = "fake"
    params = [_Param(False), _Param(False), _Param(False), _Param(True)]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setattr(launch, "_current", (lambda: 0, lambda device: 0))
    cl = launch.CachedLaunch(_FakeKernel())
    return lambda *args: cl._key(args, 4)


def test_int_key_separates_what_triton_specializes_on(key):
    x = torch.zeros(8)
    keys = {v: key(x, v, 0.5, 64) for v in (1, 2, 16, 17, 32, (1 << 31) - 16, 1 << 31, 1 << 40, 1 << 63)}
    assert keys[16] == keys[32] != keys[17]  # divisible by 16 or not
    assert keys[1] != keys[17]  # == 1 is its own specialization
    assert keys[2] == keys[17]  # neither 1 nor a multiple of 16: one kernel
    assert keys[(1 << 31) - 16] != keys[1 << 31]  # i32 -> i64
    assert keys[1 << 40] == keys[1 << 31] != keys[1 << 63]  # i64 -> u64
    assert key(x, 3, 0.5, 64) == key(x, 5, 3.0, 64)  # floats are not specialized
    assert key(x, 3, 0.5, 64) != key(x, 3, 0.5, 128)  # constexprs by value
    with pytest.raises(TypeError, match="expected an int"):
        key(x, 3.0, 0.5, 64)  # a position keeps its kind
    with pytest.raises(TypeError, match="takes 4 arguments"):
        key(x, 3, 0.5)


def test_tensor_key_has_dtype_and_alignment(key):
    buf = torch.zeros(64)
    assert key(buf[:8], 3, 0.5, 64) == key(buf[4:12], 3, 0.5, 64)  # both 16-byte aligned
    assert key(buf[1:9], 3, 0.5, 64) is None  # misaligned: Triton's own path
    assert key(buf[:8], 3, 0.5, 64) != key(buf.double()[:8], 3, 0.5, 64)


def test_hooks_count_as_idle_only_when_empty():
    import triton

    chain = type(triton.knobs.runtime.launch_enter_hook)()
    assert launch._idle(None) and launch._idle(chain)
    chain.add(print)
    assert not launch._idle(chain)
    assert not launch._idle(print)  # a bare function (older Triton): installed


def test_fast_launch_knob_rejects_unknown_modes():
    with pytest.raises(ValueError, match="choose one of"):
        launch.fast_launch.set("yes")
    assert launch.fast_launch.value in ("1", "0", "check")


def test_interpreter_takes_tritons_path():
    """Under TRITON_INTERPRET=1 (set by conftest on CPU) nothing is cached: the interpreter has no
    compiled kernel to keep, and the results are the reference's."""
    if torch.cuda.is_available():
        pytest.skip("the CPU interpreter case")
    from neuro_mar.kernels import atmn

    before = atmn._launch_once_fwd.hits, atmn._launch_once_fwd.misses
    x = torch.randn(5, 40)
    a = torch.zeros(40)
    sg = resolve_surrogate("sigmoid")
    old = atmn_ops.get_backend()
    atmn_ops.set_backend("triton")
    try:
        for _ in range(2):
            xh = atmn_ops.atmn_once(x, a, 4, 0.5, sg)[0]
    finally:
        atmn_ops.set_backend(old)
    assert (atmn._launch_once_fwd.hits, atmn._launch_once_fwd.misses) == before
    torch.testing.assert_close(xh, atmn_ref.atmn_once_ref(x, a, 4, 0.5, sg)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["1", "check"])
def test_cached_launch_matches_tritons_path_on_gpu(mode):
    """Repeat calls hit the cache; a row count divisible by 16 or not and a new dtype each get their
    own kernel, a misaligned view takes Triton's path; every result equals the reference's."""
    from neuro_mar.kernels import atmn

    sg = resolve_surrogate("sigmoid")
    launch.fast_launch.set(mode)
    try:
        buf = torch.randn(1 + 48 * 96, device="cuda") * 2
        cases = [buf[:32 * 96].view(32, 96), buf[:32 * 96].view(32, 96), buf[1:1 + 32 * 96].view(32, 96),
                 buf[:33 * 96].view(33, 96), buf[:48 * 96].view(48, 96).half(), buf[1:1 + 32 * 96].view(32, 96),
                 buf[:33 * 96].view(33, 96)]
        hits0 = atmn._launch_once_fwd.hits
        for x in cases:
            x = x.clone().requires_grad_() if x.data_ptr() % 16 == 0 else x.detach().requires_grad_()
            a = torch.full((96,), 0.1, device="cuda", requires_grad=True)
            xh, sp, _ = atmn_ops.atmn_once(x, a, 4, 0.5, sg, write_spikes=True)
            xh.float().sum().backward()
            x1, a1 = x.detach().float().clone().requires_grad_(), a.detach().clone().requires_grad_()
            xh1, sp1 = atmn_ref.atmn_once_ref(x1, a1, 4, 0.5, sg)
            xh1.sum().backward()
            assert torch.equal(sp.float(), sp1)
            torch.testing.assert_close(xh.float(), xh1, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(x.grad.float(), x1.grad, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(a.grad, a1.grad, rtol=1e-3, atol=1e-3)
        assert atmn._launch_once_fwd.hits - hits0 >= 2  # the repeats of 32 and 33 rows (misaligned: Triton's path)
    finally:
        launch.fast_launch.set("1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cached_launch_calls_installed_hooks_on_gpu():
    """A profiler's launch hook sees cached launches as it sees Triton's."""
    import triton

    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731
    sg = resolve_surrogate("sigmoid")
    x = torch.randn(64, 128, device="cuda")
    a = torch.zeros(128, device="cuda")
    atmn_ops.atmn_once(x, a, 4, 0.5, sg)  # compiled and cached before the hook goes in
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            atmn_ops.atmn_once(x, a, 4, 0.5, sg)
        torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert seen.count("_once_fwd_kernel") == 3, seen



def test_a_position_that_changes_kind_takes_tritons_path(monkeypatch):
    """None where a tensor was: the call is handed to Triton's own launch (which decides), not keyed."""
    calls = []

    class _Kernel(_FakeKernel):
        def __getitem__(self, grid):
            return lambda *args, num_warps: calls.append(args)

    monkeypatch.setattr(launch, "_current", (lambda: 0, lambda device: 0))
    cl = launch.CachedLaunch(_Kernel())
    cl._compiles = True  # a stand-in for a compiled JITFunction
    cl._layout = cl._plan((torch.zeros(4), 3, 0.5, 64))
    cl((1,), None, 3, 0.5, 64, num_warps=4)
    assert calls == [(None, 3, 0.5, 64)] and cl.misses == 0 and not cl._compiled
