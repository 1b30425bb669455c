"""Launching Triton kernels with less host time per call.

``kernel[grid](*args)`` goes through ``JITFunction.run`` on every call: it binds and specializes
each argument, builds the cache key (stringifying the options), checks the kernel's global values
and then calls the compiled kernel's launcher. For the ATMN kernels, whose device time is a few
hundred microseconds at training sizes, that path is a large share of an eager step
(benchmarks/results/atmn_host.json measures it). :class:`CachedLaunch` keeps each compiled kernel
under a key made from what Triton specializes on and, on a hit, makes the same launcher call
``JITFunction.run`` ends in.

The key holds, per argument: the value of a constexpr; the dtype of a tensor (and that all tensors
are 16-byte aligned); for an int, divisibility by 16, equality to 1 and its integer width
(i32 / i64 / u64); the type of anything else (floats and bools are not specialized by value); and
the launch options and current device. A miss takes Triton's own path, which compiles if needed
and returns the compiled kernel to keep.

Launch hooks (profilers such as proton) see these launches as they see Triton's. Triton's own path
is taken when ``NEURO_MAR_FAST_LAUNCH=0`` (or ``fast_launch.set("0")``) and under
``TRITON_INTERPRET=1``. With ``NEURO_MAR_FAST_LAUNCH=check`` every hit is compared with the kernel Triton's own
path picks (the GPU tests run that way, so a Triton release that specializes on more than this key
holds is caught rather than silently launching the wrong specialization).
"""
from __future__ import annotations

import torch
import triton
from triton.runtime.jit import JITFunction

from neuro_mar.knobs import Knob


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), in plain integers: triton.next_power_of_2 is a
    constexpr function now and costs microseconds of host time per call."""
    return 1 << (max(n, 1) - 1).bit_length()

#: ``"1"`` (cached launches), ``"0"`` (always Triton's path) or ``"check"`` (cached, verified)
fast_launch = Knob("fast-launch mode", "NEURO_MAR_FAST_LAUNCH", ("1", "0", "check"), "1")


_current = None  # (get_current_device, get_current_stream) of Triton's active driver, bound once


def _device_and_stream_getters():
    global _current
    if _current is None:
        driver = triton.runtime.driver.active
        _current = (driver.get_current_device, driver.get_current_stream)
    return _current


def _idle(hook) -> bool:
    """No launch hook installed (an empty HookChain in Triton >= 3.4, None before)."""
    return not getattr(hook, "calls", hook)


def _int_key(v: int) -> tuple:
    """Triton's specialization of an int argument: divisible by 16, equal to 1, i32 / i64 / u64."""
    if type(v) is not int:
        raise TypeError(f"expected an int argument, got {type(v).__name__}")
    width = 0 if -(1 << 31) <= v < (1 << 31) else (1 if -(1 << 63) <= v < (1 << 63) else 2)
    return v % 16 == 0, v == 1, width


class CachedLaunch:
    """``CachedLaunch(jit_fn)(grid, *args, num_warps=8)`` launches ``jit_fn`` as
    ``jit_fn[grid](*args, num_warps=8)`` would; every argument positional, grid a tuple of 1-3 ints.
    Returns the compiled kernel (``None`` under the interpreter).

    The first cached call records which positions hold constexprs, tensors, ints and other values.
    A call whose positions changed kind (a launcher that always passes the same signature never
    does), or with a tensor that is not 16-byte aligned (rare: fresh allocations are), goes through
    Triton's path, so the key needs one alignment bit for all tensors."""

    def __init__(self, fn):
        self.fn = fn
        # under TRITON_INTERPRET=1 (decided when the kernel was decorated) there is nothing compiled to keep
        self._compiles = isinstance(fn, JITFunction)
        self._layout: tuple | None = None
        self._compiled: dict = {}
        self.hits = 0
        self.misses = 0

    def _plan(self, args) -> tuple:
        params = self.fn.params
        if len(args) != len(params):
            raise TypeError(f"{self.fn.__name__} takes {len(params)} arguments, got {len(args)}")
        consts = tuple(i for i, p in enumerate(params) if p.is_constexpr)
        tensors = tuple(i for i in range(len(args)) if i not in consts and isinstance(args[i], torch.Tensor))
        ints = tuple(i for i in range(len(args)) if i not in consts and type(args[i]) is int)
        others = tuple(i for i in range(len(args)) if i not in consts + tensors + ints)
        return len(args), consts, tensors, ints, others

    def _key(self, args, num_warps: int):
        """The cache key, or None when a tensor is not 16-byte aligned."""
        if self._layout is None:
            self._layout = self._plan(args)
        n, consts, tensors, ints, others = self._layout
        if len(args) != n:
            raise TypeError(f"{self.fn.__name__} takes {n} arguments, got {len(args)}")
        ptrs = 0
        dtypes = []
        for i in tensors:
            t = args[i]
            ptrs |= t.data_ptr()
            dtypes.append(t.dtype)
        if ptrs & 15:
            return None
        return (_device_and_stream_getters()[0](), num_warps, tuple([args[i] for i in consts]), tuple(dtypes),
                tuple([_int_key(args[i]) for i in ints]), tuple([type(args[i]) for i in others]))

    def __call__(self, grid, *args, num_warps: int):
        if fast_launch.value == "0" or not self._compiles:
            return self.fn[grid](*args, num_warps=num_warps)
        try:
            key = self._key(args, num_warps)
        except (AttributeError, TypeError):  # a position changed kind (say None for a tensor): Triton decides
            key = None
        if key is None:
            return self.fn[grid](*args, num_warps=num_warps)
        kernel = self._compiled.get(key)
        if kernel is None:
            self.misses += 1
            kernel = self.fn[grid](*args, num_warps=num_warps)
            if hasattr(kernel, "result"):  # an asynchronous compile: wait for it once, here
                kernel = kernel.result()
            self._compiled[key] = kernel
            return kernel
        if fast_launch.value == "check":
            picked = self.fn.warmup(*args, grid=grid, num_warps=num_warps)
            if getattr(picked, "hash", None) != getattr(kernel, "hash", None):
                raise AssertionError(f"{self.fn.__name__}: cached launch picked {kernel.hash}, Triton picks "
                                     f"{picked.hash} for the same arguments (key {key})")
        self.hits += 1
        stream = _device_and_stream_getters()[1](key[0])
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
        if _idle(enter) and _idle(leave):  # what the launcher does with empty hooks, without calling them
            kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *args)
        else:
            kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata,
                       kernel.launch_metadata(grid, stream, *args), enter, leave, *args)
        return kernel
