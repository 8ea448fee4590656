"""Every Triton kernel compiles ahead of time for sm_90 (H100/H200), no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for the real target: each autotuning config of each
matmul kernel must produce a cubin that fits the 227 KiB of shared memory a block may use, and
the matmuls must reach the tensor cores (``wgmma`` / ``mma`` in the PTX).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("ahead-of-time compilation needs TRITON_INTERPRET unset", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from supsup_fast.kernels import mask_ops as mo  # noqa: E402
from supsup_fast.kernels import masked_matmul as mm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# scalar arguments, by name, across all kernels
SCALARS = {"M": "i32", "N": "i32", "K": "i32", "WPR": "i32", "T": "i32", "K_SPLIT": "i32", "key": "i32", "scale": "fp32"}


def _signature(fn, ptr_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        else:
            sig[name] = ptr_types[name]
    return sig


def _compile(fn, ptr_types, constexprs, num_warps=4, num_stages=3):
    src = ASTSource(fn, signature=_signature(fn, ptr_types, constexprs), constexprs=constexprs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def _check(kernel, tensor_cores: bool):
    assert kernel.asm.get("cubin"), "no cubin produced"
    assert kernel.metadata.shared <= SMEM_LIMIT, f"needs {kernel.metadata.shared} B of shared memory"
    ptx = kernel.asm["ptx"]
    assert ".target sm_90" in ptx
    if tensor_cores:
        assert "wgmma" in ptx or "mma.sync" in ptx, "the matmul does not use tensor cores"


def _matmul_cases():
    """(id, autotuned kernel, pointer roles, extra constexprs, tensor cores?)."""
    x, i32 = "x", "*i32"
    return [
        ("fwd", mm.masked_linear_kernel, dict(x_ptr=x, w_ptr=x, words_ptr=i32, bias_ptr=x, y_ptr=x),
         dict(HAS_BIAS=True, SEEDED=False, UPCAST=False), True),
        ("fwd_seeded", mm.masked_linear_kernel, dict(x_ptr=x, w_ptr=x, words_ptr=i32, bias_ptr=x, y_ptr=x),
         dict(HAS_BIAS=False, SEEDED=True, UPCAST=False), True),
        ("splitk", mm.masked_splitk_kernel, dict(x_ptr=x, w_ptr=x, words_ptr=i32, bias_ptr=x, out_ptr=x),
         dict(HAS_BIAS=True, SEEDED=False, PARTIAL=False, UPCAST=False, BLOCK_M=16, BLOCK_N=64), True),
        ("splitk_partial_seeded", mm.masked_splitk_kernel,
         dict(x_ptr=x, w_ptr=x, words_ptr=i32, bias_ptr="*fp32", out_ptr="*fp32"),
         dict(HAS_BIAS=False, SEEDED=True, PARTIAL=True, UPCAST=False, BLOCK_M=16, BLOCK_N=64), True),
        ("grad_input", mm.masked_grad_input_kernel, dict(g_ptr=x, w_ptr=x, words_ptr=i32, dx_ptr=x),
         dict(UPCAST=False), True),
        ("score_grad", mm.masked_weight_grad_kernel, dict(g_ptr=x, x_ptr=x, w_ptr=x, out_ptr=x),
         dict(UPCAST=False), True),
        ("grouped", mm.masked_linear_grouped_kernel,
         dict(x_ptr=x, w_ptr=x, bank_ptr=i32, task_ptr=i32, perm_ptr=i32, bias_ptr=x, y_ptr=x),
         dict(HAS_BIAS=True, UPCAST=False), True),
    ]


def _roles(roles: dict, dtype) -> dict:
    return {k: PTR[dtype] if v == "x" else v for k, v in roles.items()}


MATMULS = _matmul_cases()


# every kernel in bf16; the dtype-dependent paths (fp16 and tf32 dots) for the two main GEMMs
DTYPE_CASES = [(c, torch.bfloat16) for c in MATMULS] + [
    (c, dt) for c in MATMULS if c[0] in ("fwd", "grad_input") for dt in (torch.float16, torch.float32)
]


@pytest.mark.parametrize("case,dtype", DTYPE_CASES, ids=[f"{c[0]}-{str(dt)[6:]}" for c, dt in DTYPE_CASES])
def test_matmul_kernels_compile_for_sm90(case, dtype):
    _, kernel, roles, extra, tensor_cores = case
    config = kernel.configs[0]
    k = _compile(kernel.fn, _roles(roles, dtype), {**extra, **config.kwargs}, config.num_warps, config.num_stages)
    _check(k, tensor_cores)


def _smem_estimate(config, extra) -> int:
    """Elements of pipelined operand tiles: a config's shared-memory appetite, up to a constant factor."""
    kw = {**extra, **config.kwargs}
    dims = sorted((v for k, v in kw.items() if k.startswith("BLOCK_")), reverse=True)
    big = dims[0] * dims[1] + (dims[1] * dims[2] if len(dims) > 2 else 0)
    return big * config.num_stages


KERNELS = {c[1].fn.__name__: c for c in MATMULS}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_largest_autotune_config_fits(name):
    """The hungriest GPU config of each matmul (bf16) compiles and fits in shared memory; one that
    did not would fail at launch on the GPU."""
    _, kernel, roles, extra, tensor_cores = KERNELS[name]
    assert len(kernel.configs) > 1, "the GPU config list should offer the autotuner a choice"
    config = max(kernel.configs, key=lambda c: _smem_estimate(c, extra))
    extra = {k: v for k, v in extra.items() if k not in config.kwargs}
    k = _compile(kernel.fn, _roles(roles, torch.bfloat16), {**extra, **config.kwargs}, config.num_warps,
                 config.num_stages)
    _check(k, tensor_cores)


BLOCKS = dict(BLOCK_N=mo._BN, BLOCK_K=mo._BK)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_mask_kernels_compile_for_sm90(dtype):
    p = PTR[dtype]
    cases = [
        (mo.apply_mask_kernel, dict(w_ptr=p, words_ptr="*i32", out_ptr=p), BLOCKS),
        (mo.unpack_kernel, dict(words_ptr="*i32", out_ptr=p), BLOCKS),
        (mo.pack_kernel, dict(m_ptr=p, words_ptr="*i32"), dict(BLOCK_N=mo._BN, BLOCK_W=8)),
        (mo.superpose_kernel, dict(w_ptr=p, bank_ptr="*i32", alpha_ptr="*fp32", out_ptr=p), BLOCKS),
        (mo.mask_dots_kernel, dict(v_ptr=p, bank_ptr="*i32", out_ptr="*fp32"), BLOCKS),
        (mo.signed_constant_kernel, dict(out_ptr=p), BLOCKS),
    ]
    for fn, roles, const in cases:
        _check(_compile(fn, roles, const), tensor_cores=False)


def test_pack_and_unpack_compile_for_byte_masks():
    _check(_compile(mo.pack_kernel, dict(m_ptr="*u8", words_ptr="*i32"), dict(BLOCK_N=mo._BN, BLOCK_W=8)), False)
    _check(_compile(mo.unpack_kernel, dict(words_ptr="*i32", out_ptr="*u8"), BLOCKS), False)


def test_seeded_hash_is_integer_only():
    """The regenerated weight is made from integer ops on uint32: multiplies by the lowbias32 constants."""
    k = _compile(mo.signed_constant_kernel, dict(out_ptr="*fp32"), BLOCKS)
    ptx = k.asm["ptx"]
    assert "2146121005" in ptx or "0x7FEB352D" in ptx.upper() or "0X7FEB352D" in ptx.upper()
    assert "ld.global" not in ptx, "the signed constant must not read any weight"
