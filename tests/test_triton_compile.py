"""Every Triton kernel compiles to sm_90 (Hopper) machine code, without a GPU.

Triton's CPU interpreter runs the kernels' arithmetic but not the compiler: it accepts, for example,
a ``tl.dot`` of bf16 and fp32 operands that the compiler rejects. These tests compile each kernel
ahead of time for a ``GPUTarget("cuda", 90, 32)`` with the dtypes and block sizes the wrappers use.
They are marked ``triton_aot``: they always run in a child process whose environment has no
``TRITON_INTERPRET`` (see ``triton_env``), since ``triton.compile`` fails once Triton was imported
under its interpreter. Triton is imported only inside the tests, never at collection.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.triton_aot
HOPPER = (90, 32)  # compute capability, warp size


@pytest.fixture(scope="module")
def compiler():
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from pof_fast.backends.triton import interpreting, load_kernels

    assert not interpreting(), "ahead-of-time compiles need a process without TRITON_INTERPRET=1"
    return load_kernels(), GPUTarget("cuda", *HOPPER)


def compile_for_hopper(compiler, fn, pointer_types: dict, constexprs: dict, num_warps: int = 4):
    """Compile ``fn``: ``*_ptr`` arguments fp32 unless named in ``pointer_types``, other arguments i64
    when named ``ignore_index`` (a Python int that may be negative) else i32."""
    import triton
    from triton.compiler import ASTSource

    _, target = compiler
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        else:
            signature[name] = "i64" if name == "ignore_index" else "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
    assert compiled.asm["cubin"], f"{fn.__name__}: no sm_90 machine code"
    assert f".target sm_{HOPPER[0]}" in compiled.asm["ptx"], f"{fn.__name__}: PTX not for sm_{HOPPER[0]}"
    return compiled


@pytest.mark.parametrize("dtype", ["*fp32", "*bf16", "*fp16"])
def test_line_stats_kernels_compile(compiler, dtype):
    ls = compiler[0].line_stats
    compile_for_hopper(compiler, ls._line_stats_kernel, {"z_ptr": dtype, "d_ptr": "*fp32", "y_ptr": "*i64"},
                       dict(HAS_SCALE=True, BLOCK_N=ls.BLOCK_N, BLOCK_K=ls.MAX_BLOCK_K, BLOCK_C=32),
                       num_warps=ls.NUM_WARPS)
    compile_for_hopper(compiler, ls._reduce_kernel, {}, dict(BLOCK_P=ls.REDUCE_BLOCK_P, BLOCK_K=ls.MAX_BLOCK_K))


@pytest.mark.parametrize("dtype", ["*fp32", "*bf16"])
def test_head_residual_kernels_compile(compiler, dtype):
    hr = compiler[0].head_residual
    compile_for_hopper(compiler, hr._residual_kernel, {"z_ptr": dtype, "y_ptr": "*i64"},
                       dict(BLOCK_N=hr.RES_BLOCK_N, BLOCK_C=hr.RES_MAX_BLOCK_C))
    compile_for_hopper(compiler, hr._norm_kernel, {"y_ptr": "*i64"},
                       dict(HAS_BIAS=True, FROM_RESIDUAL=True, BLOCK_N=hr.NORM_BLOCK_N, BLOCK_C=hr.NORM_BLOCK_C,
                            BLOCK_D=hr.NORM_BLOCK_D))
    compile_for_hopper(compiler, hr._finish_kernel, {}, dict(NORMALIZED=True, BLOCK_P=hr.FINISH_BLOCK_P))


@pytest.mark.parametrize("dtype,dot_fp32", [("*bf16", False), ("*fp16", False), ("*fp32", True)])
def test_logits_free_kernel_compiles(compiler, dtype, dot_fp32):
    lf = compiler[0].logits_free
    # 16-bit inputs: g_W comes in the input dtype (tensor-core dots); fp32: fp32 everywhere.
    pointers = {"h_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "gw_ptr": dtype, "y_ptr": "*i64"}
    compiled = compile_for_hopper(
        compiler, lf._logits_free_kernel, pointers,
        dict(HAS_BIAS=True, DOT_FP32=dot_fp32, BLOCK_N=lf.LF_BLOCK_N, BLOCK_K=lf.LF_MAX_BLOCK_K,
             BLOCK_C=lf.LF_BLOCK_C, BLOCK_D=lf.LF_BLOCK_D),
        num_warps=lf.LF_NUM_WARPS,
    )
    assert compiled.metadata.shared <= 227 * 1024  # fits an H100/H200 SM's shared memory
