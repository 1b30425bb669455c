"""Compile every Triton kernel of this package for a GPU target without a GPU.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which executes their Python and never
meets the compiler: a kernel that the interpreter runs can still fail to compile (tuple indexing,
constexpr rules, types). This check calls the real launchers on small CPU tensors with Triton's
launch replaced by ``triton.compile`` for an NVIDIA target (Hopper by default; ptxas ships in the
triton wheel), so it compiles exactly the variants the launchers request, down to cubin.

    python -m neuro_mar.kernels.compile_check [--arch 90] [--list]

Exit status 0 when every variant compiled. Needs triton with its NVIDIA backend; no CUDA driver.
Must not run with TRITON_INTERPRET=1 (the kernels would be interpreter objects).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
           torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"compile_check: no Triton type for argument {value!r}")


def _divisibility(names, bound, const_names) -> dict:
    """The specialisation Triton's launcher applies: pointers 16-byte aligned and integers that are
    multiples of 16 are marked so (what lets the compiler vectorise loads and stores)."""
    attrs = {}
    for i, n in enumerate(names):
        v = bound[n]
        if n in const_names or isinstance(v, bool):
            continue
        if (isinstance(v, torch.Tensor) and v.data_ptr() % 16 == 0) or (isinstance(v, int) and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


class _Compiler:
    """Stands in for ``JITFunction.run``: compiles the requested variant instead of launching."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.done: list[tuple[str, dict, float]] = []

    def __call__(self, fn, *args, grid=None, warmup=False, **kwargs):
        import triton
        from triton.compiler import ASTSource

        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        missing = [n for n in names if n not in bound]
        if missing:
            raise TypeError(f"{fn.__name__}: arguments {missing} not given")
        const_names = {names[p.num] for p in fn.params if p.is_constexpr}
        signature = {n: "constexpr" if n in const_names else _arg_type(bound[n]) for n in names}
        constexprs = {n: bound[n] for n in const_names}
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                            attrs=_divisibility(names, bound, const_names)),
                                  target=self.target, options=options)
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"{fn.__name__}: no cubin produced")
        self.done.append((fn.__name__, constexprs, time.perf_counter() - t0))


def _variants():
    """(description, thunk) pairs: each thunk calls a launcher on small CPU tensors."""
    from . import atmn
    from .sbds import sbds_rows_

    x = torch.randn(6, 300)  # C = 300: not a multiple of 16, so the unvectorised variants compile too
    V = torch.rand(300) + 0.5
    out = []
    for T in (4, 17):
        out.append((f"once fwd T={T} spikes+counts", lambda T=T: atmn.once_fwd(x, V, T, 0.5, True, True, True)))
    out.append(("once fwd bf16 binary", lambda: atmn.once_fwd(x.bfloat16(), V, 4, 0.5, False)))
    x16, V16 = torch.randn(32, 1024), torch.rand(1024) + 0.5  # aligned: the vectorised variants
    out.append(("once fwd+bwd C=1024", lambda: (atmn.once_fwd(x16, V16, 4, 0.5), atmn.once_bwd(x16, x16, V16, 4, 0.5, 0, 4.0))))
    xs16 = torch.randn(4, 32, 1024)
    out.append(("multi fwd+bwd C=1024", lambda: (atmn.multi_fwd(xs16, V16, 0.5),
                                                 atmn.multi_bwd(xs16, None, torch.empty(0), xs16, None, V16, 0.5, 0, 4.0))))
    for sg in range(5):
        out.append((f"once bwd surrogate {sg}", lambda sg=sg: atmn.once_bwd(x, x, V, 4, 0.5, sg, 4.0)))
    out.append(("once bwd binary detached T=17", lambda: atmn.once_bwd(x, x, V, 17, 0.5, 0, 4.0, False, True)))
    for T, v0 in ((4, None), (12, x), (17, x)):
        xs = torch.randn(T, 6, 300)
        out.append((f"multi fwd T={T}", lambda xs=xs, v0=v0: atmn.multi_fwd(xs, V, 0.5, True, v0)))
    for T, sg, with_state in ((4, 0, True), (8, 1, False), (3, 4, True), (12, 0, True), (17, 2, False)):
        xs = torch.randn(T, 6, 300)
        h = torch.randn(T, 6, 300) if T > 8 else torch.empty(0)
        st = torch.randn(6, 300) if with_state else None
        out.append((f"multi bwd T={T} surrogate {sg}{' with state' if with_state else ''}",
                    lambda xs=xs, h=h, st=st, sg=sg: atmn.multi_bwd(xs, st, h, xs, st, V, 0.5, sg, 4.0)))
    from . import causal_conv

    base = torch.randn(2, 40, 2320, dtype=torch.bfloat16)  # xBC: a column slice of in_proj's padded output
    for K, with_bias in ((4, True), (2, False)):
        w, cb = torch.randn(1728, K), torch.randn(1728) if with_bias else None
        out.append((f"causal conv K={K} fwd+bwd bf16 strided", lambda w=w, cb=cb: (
            causal_conv.conv_fwd(base[..., :1728], w, cb), causal_conv.conv_bwd(base[..., :1728], base[..., :1728], w, cb))))
    def looped_bwd():  # several time tiles per backward program (MAX_LOOP > 1: the tuned default is 1)
        big, loop = torch.empty(16, 1024, 1728, dtype=torch.bfloat16), causal_conv.MAX_LOOP
        causal_conv.MAX_LOOP = 8
        try:
            causal_conv.conv_bwd(big, big, torch.randn(1728, 4), torch.randn(1728))
        finally:
            causal_conv.MAX_LOOP = loop
    out.append(("causal conv bwd, looped", looped_bwd))
    xc = torch.randn(3, 7, 45)
    out.append(("causal conv fp32 C=45", lambda: (causal_conv.conv_fwd(xc, torch.randn(45, 4), None),
                                                  causal_conv.conv_bwd(xc, xc, torch.randn(45, 4), torch.randn(45)))))
    s = torch.randn(3, 1000, dtype=torch.bfloat16)
    out.append(("sbds rows bf16", lambda: sbds_rows_(s, s.clone(), torch.ones(3), 0.5, 0.5, 1.0)))
    out.append(("sbds rows fp32 wide", lambda: sbds_rows_(torch.randn(2, 5000), torch.randn(2, 5000),
                                                          torch.ones(2), 1.0, 0.0, 2.0)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper, the H200)")
    p.add_argument("--list", action="store_true", help="print each compiled variant and its time")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check: unset TRITON_INTERPRET (the interpreter never compiles)")
    from triton.runtime.jit import JITFunction

    from .launch import fast_launch

    compiler = _Compiler(args.arch)
    real_run, fast = JITFunction.run, fast_launch.value
    JITFunction.run = lambda fn, *a, **k: compiler(fn, *a, **k)
    fast_launch.set("0")  # every launch through JITFunction.run (cached launches ask the CUDA driver)
    failures = []
    try:
        for name, thunk in _variants():
            try:
                thunk()
            except Exception as err:  # noqa: BLE001 - every failure is reported, then the status says it
                failures.append(f"{name}: {type(err).__name__}: {str(err)[:2000]}")
    finally:
        JITFunction.run = real_run
        fast_launch.set(fast)
    if args.list:
        for kernel, constexprs, sec in compiler.done:
            print(f"{kernel:20s} {sec:5.1f} s  {constexprs}")
    print(f"compiled {len(compiler.done)} kernel variants for sm_{args.arch}; {len(failures)} failed")
    for f in failures:
        print("FAILED", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
