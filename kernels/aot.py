"""Every Triton kernel compiled ahead of time for sm_90 (H100/H200) as real launches compile it.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the
whole pipeline down to a cubin. Each case carries the *specialisations a real launch gets*: every
pointer (torch allocations are 16-byte aligned) and every size that is a multiple of 16 in the
layers that matter (N, K, words per row, split lengths) is marked ``tt.divisibility = 16``, which
is what turns plain loads into pipelined ``cp.async`` copies and multiplies shared memory; sizes
the kernels do not specialise on (M, T) stay plain. ``cuobjdump`` (shipped with Triton) gives the
resource usage (registers, shared memory, LOCAL = spill bytes per thread) and the SASS, from
which :func:`main_loop` finds the innermost loop that masks weights and counts its instructions
per weight element.

``python -m supsup_fast.kernels.aot OUT.json`` writes every case x config x dtype with these
numbers (``bench/results/offline-sm90/`` keeps one file per Triton version; ``--table OUT.json``
prints the markdown summary); ``tests/test_triton_aot.py`` asserts on them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import mask_ops as mo
from . import masked_matmul as mm

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
       torch.uint8: "*u8"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALAR_TYPES = {"key": "i32", "key2": "i32", "scale": "fp32"}  # every other scalar argument is an i32 size
# sizes a real launch passes as multiples of 16 (pointers always are)
DIV16 = {"N", "K", "WPR", "K_SPLIT", "N_SPLIT", "SLAB"}
MASK_OPS = ("SHF", "PRMT", "LOP3", "SEL")  # every integer op a bit test and select may compile to


def unpack_instructions(body) -> int:
    """The instructions of :func:`._common.keep` itself: for 16-bit weights two rotates
    (``SHF.L.W``), one ``PRMT ..., 0xff99`` and one ``LOP3`` (the and) per pair; for 32-bit
    weights a bit test into a predicate (``LOP3.LUT P, RZ, word, onehot, RZ, 0xc0``) and the
    ``SEL`` it feeds, counted as two per test (other selects of the loop are not the mask's)."""
    n = 0
    for _, op, rest in body:
        if op.startswith("SHF.L.W"):
            n += 1
        elif op == "PRMT" and "0xff99" in rest:
            n += 2
        elif op == "LOP3.LUT" and re.match(r"\s*P\d, RZ, R\d+(?:\.reuse)?, R\d+(?:\.reuse)?, RZ, 0xc0", rest):
            n += 2
    return n



def _bin(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel as one launcher calls it."""

    name: str
    kernel: object  # a ByDtype (one autotuner per dtype class), an Autotuner, or a JITFunction
    roles: dict  # pointer argument -> "x" (the case's dtype) or a fixed pointer type
    fixed: dict  # constexprs the launcher sets
    weights: Optional[Callable[[dict], int]] = None  # weight elements one main-loop trip of a block masks
    tensor_cores: bool = True
    dtypes: tuple = DTYPES
    kind: Optional[str] = None  # fwd / dx / ds: the shared-memory model the autotuner prunes with

    @property
    def fn(self):
        """The JIT function (a tuner's ``.fn``; a JITFunction's own ``.fn`` is its Python source)."""
        return self.kernel if isinstance(self.kernel, triton.runtime.JITFunction) else self.kernel.fn

    def configs_for(self, dtype) -> list:
        """The configs the autotuner would try for inputs of ``dtype`` (``[None]``: no autotuning)."""
        tuner = self.kernel[dtype] if isinstance(self.kernel, mm.ByDtype) else self.kernel
        return list(getattr(tuner, "configs", [None]))


def _nk(c):
    return c["BLOCK_N"] * c["BLOCK_K"]


def cases() -> list[Case]:
    x, i32, f32 = "x", "*i32", "*fp32"
    lin = dict(x_ptr=x, w_ptr=x, words_ptr=i32, bias_ptr=x, y_ptr=x, ws_ptr=f32, cnt_ptr=i32)
    dx = dict(g_ptr=x, w_ptr=x, words_ptr=i32, dx_ptr=x, ws_ptr=f32, cnt_ptr=i32)
    flags = dict(UPCAST=False)
    gemv = dict(HAS_BIAS=True, SEEDED=False, SPLIT_K=True, EVICT_W=True, SEED_V2=False, BLOCK_N=mm._GEMV_BLOCK_N,
                GROUP=1, **flags)
    out = []
    for bm in (16, 64):
        out.append(Case(f"gemv_m{bm}", mm.masked_gemv, lin, dict(gemv, BLOCK_M=bm), _nk, kind="fwd"))
    out += [
        Case("gemv_m16_seeded", mm.masked_gemv, lin, dict(gemv, SEEDED=True, BLOCK_M=16), _nk, kind="fwd"),
        Case("gemv_m16_seeded_v2", mm.masked_gemv, lin, dict(gemv, SEEDED=True, SEED_V2=True, BLOCK_M=16), _nk,
             kind="fwd"),
        Case("gemm", mm.masked_gemm, lin,
             dict(HAS_BIAS=True, SEEDED=False, SPLIT_K=False, EVICT_W=False, SEED_V2=False, **flags), _nk, kind="fwd"),
    ]
    for bm in (16, 64):
        out.append(Case(f"dx_split_m{bm}", mm.masked_grad_input_split, dx,
                        dict(SPLIT_N=True, EVICT_W=True, BLOCK_K=mm._DX_BLOCK_K, BLOCK_M=bm, GROUP=1, **flags), _nk,
                        kind="dx"))
    out += [
        Case("dx_gemm", mm.masked_grad_input_gemm, dx, dict(SPLIT_N=False, EVICT_W=False, **flags), _nk, kind="dx"),
        Case("score_grad", mm.masked_weight_grad_tuned, dict(g_ptr=x, x_ptr=x, w_ptr=x, out_ptr=x), dict(flags),
             kind="ds"),
        Case("grouped", mm.masked_linear_grouped_tuned,
             dict(x_ptr=x, w_ptr=x, bank_ptr=i32, task_ptr=i32, perm_ptr=i32, bias_ptr=x, y_ptr=x),
             dict(HAS_BIAS=True, **flags), _nk, kind="fwd"),
        Case("grouped_dx", mm.masked_grouped_grad_input_tuned,
             dict(g_ptr=x, w_ptr=x, bank_ptr=i32, task_ptr=i32, perm_ptr=i32, dx_ptr=x), dict(flags), _nk,
             kind="dx"),
    ]
    blocks = dict(BLOCK_N=mo._BN, BLOCK_K=mo._BK)
    mask_dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    out += [
        Case("apply_mask", mo.apply_mask_kernel, dict(w_ptr=x, words_ptr=i32, out_ptr=x), blocks, _nk, False,
             mask_dtypes),
        Case("unpack", mo.unpack_kernel, dict(words_ptr=i32, out_ptr=x), blocks, None, False,
             mask_dtypes + (torch.uint8,)),
        Case("pack", mo.pack_kernel, dict(m_ptr=x, words_ptr=i32), dict(BLOCK_N=mo._BN, BLOCK_W=8), None, False,
             mask_dtypes + (torch.uint8,)),
        Case("superpose", mo.superpose_kernel, dict(w_ptr=x, bank_ptr=i32, alpha_ptr=f32, out_ptr=x), blocks, _nk,
             False, mask_dtypes),
        Case("mask_dots", mo.mask_dots_kernel, dict(v_ptr=x, bank_ptr=i32, out_ptr=f32), blocks, _nk, False,
             mask_dtypes),
        Case("signed_constant", mo.signed_constant_kernel, dict(out_ptr=x), blocks, None, False, mask_dtypes),
    ]
    return out


def constexprs(case: Case, config, dtype) -> dict:
    c = dict(case.fixed)
    if config is not None:
        c.update(config.kwargs)
    names = set(case.fn.arg_names)
    if "TF32" in names:
        c.setdefault("TF32", False)  # torch's default: IEEE fp32 matmuls
    return c


def compile_case(case: Case, config, dtype):
    fn = case.fn
    consts = constexprs(case, config, dtype)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in case.roles:
            role = case.roles[name]
            sig[name] = PTR[dtype] if role == "x" else role
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = SCALAR_TYPES.get(name, "i32")
            if name in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {} if config is None else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=TARGET, options=options)


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_and_resources(kernel) -> tuple[list[tuple[int, str, str]], dict]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return [(int(a, 16), op, rest) for a, op, rest in _LINE.findall(sass)], usage


def main_loop(ins) -> list[tuple[int, str, str]]:
    """The largest innermost loop (a backward branch enclosing no other), or ``[]``."""
    loops = []
    for pc, op, rest in ins:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) < pc:
                loops.append((int(m.group(1), 16), pc))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    bodies = [[i for i in ins if lo <= i[0] <= hi] for lo, hi in inner]
    return max(bodies, key=len, default=[])


def analyse(case: Case, config, dtype) -> dict:
    k = compile_case(case, config, dtype)
    ins, usage = sass_and_resources(k)
    consts = constexprs(case, config, dtype)
    warps = k.metadata.num_warps
    rec = {
        "kernel": case.name, "dtype": str(dtype).replace("torch.", ""),
        "config": None if config is None else {**config.kwargs, "num_warps": config.num_warps,
                                               "num_stages": config.num_stages},
        "shared_bytes": int(k.metadata.shared), "registers": usage.get("reg"), "local_bytes": usage.get("local"),
        "stack_bytes": usage.get("stack"), "fits": int(k.metadata.shared) <= SMEM_LIMIT,
        "hgmma": any(op.startswith("HGMMA") for _, op, _ in ins),
        "sass_instructions": len(ins),
    }
    body = main_loop(ins)
    hist = collections.Counter(op.split(".")[0] for _, op, _ in body)
    rec["loop_instructions"] = len(body)
    rec["loop_opcodes"] = dict(hist.most_common(12))
    if case.weights is not None:
        per_thread = case.weights(consts) / (32 * warps)
        if body:
            rec["loop_instr_per_weight"] = round(len(body) / per_thread, 3)
            rec["mask_alu_per_weight"] = round(sum(hist[o] for o in MASK_OPS) / per_thread, 3)
            rec["unpack_per_weight"] = round(unpack_instructions(body) / per_thread, 3)
        else:  # one tile per program: the whole kernel is the cost of its weights
            whole = collections.Counter(op.split(".")[0] for _, op, _ in ins)
            rec["kernel_instr_per_weight"] = round(len(ins) / per_thread, 3)
            rec["mask_alu_per_weight"] = round(sum(whole[o] for o in MASK_OPS) / per_thread, 3)
            rec["unpack_per_weight"] = round(unpack_instructions(ins) / per_thread, 3)
    return rec


def launchable(case: Case, config, dtype) -> bool:
    """Whether the autotuner keeps this config for this dtype (its shared-memory estimate fits)."""
    if case.kind is None or config is None:
        return True
    meta = {**case.fixed, **config.kwargs}
    return mm.config_fits(case.kind, meta, config.num_stages, torch.empty(0, dtype=dtype).element_size())


def tensor_cores_expected(case: Case, dtype) -> bool:
    return case.tensor_cores and dtype in (torch.float16, torch.bfloat16)


def run_all(selected: Optional[set] = None, pruned_too: bool = False) -> list[dict]:
    """Every case x dtype x config (``pruned_too``: also those the autotuner would drop)."""
    records = []
    for case in cases():
        if selected and case.name not in selected:
            continue
        for dtype in case.dtypes:
            for i, config in enumerate(case.configs_for(dtype)):
                kept = launchable(case, config, dtype)
                if not kept and not pruned_too:
                    continue
                rec = analyse(case, config, dtype)
                rec["default_config"] = i == 0
                rec["pruned"] = not kept
                records.append(rec)
    return records


def _ptxas_version() -> str:
    try:
        out = subprocess.run([_bin("ptxas"), "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]
    except Exception as e:  # pragma: no cover - informational only
        return f"unknown ({e})"


def report(records: list[dict]) -> dict:
    return {"triton": triton.__version__, "ptxas": _ptxas_version(), "target": "sm_90",
            "smem_limit_bytes": SMEM_LIMIT, "records": records}


def table(rep: dict) -> str:
    """A markdown table of every kernel x dtype: its default config's numbers and the range over
    all launchable configs of the instructions per weight."""
    rows = ["| kernel | dtype | default config: smem KiB / regs / spill B | loop instr/weight (all configs) "
            "| unpack instr/weight | HGMMA |", "|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rep["records"]:
        groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
    for (kernel, dtype), recs in groups.items():
        d = next((r for r in recs if r.get("default_config")), recs[0])
        per = [r.get("loop_instr_per_weight", r.get("kernel_instr_per_weight")) for r in recs]
        per = [p for p in per if p is not None]
        unp = [r["unpack_per_weight"] for r in recs if r.get("unpack_per_weight") is not None]
        def span(v):
            if not v:
                return "-"
            return f"{min(v):.2f}" if min(v) == max(v) else f"{min(v):.2f}-{max(v):.2f}"

        rows.append(f"| {kernel} | {dtype} | {d['shared_bytes'] / 1024:.0f} / {d['registers']} / {d['local_bytes']} "
                    f"| {span(per)} | {span(unp)} | {'yes' if d['hgmma'] else 'no'} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    if argv[1] == "--table":
        with open(argv[2]) as f:
            print(table(json.load(f)))
        return 0
    sel = set(argv[2].split(",")) if len(argv) > 2 else None
    rep = report(run_all(sel))
    with open(argv[1], "w") as f:
        json.dump(rep, f, indent=1)
    for r in rep["records"]:
        cfgs = "" if r["config"] is None else " ".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"{r['kernel']:18s} {r['dtype']:9s} {'pruned ' if r['pruned'] else ''}"
              f"smem={r['shared_bytes']:7d} regs={r['registers']:3d} "
              f"local={r['local_bytes']} loop={r['loop_instructions']:4d} "
              f"/w={r.get('loop_instr_per_weight', r.get('kernel_instr_per_weight', '-'))} "
              f"mask/w={r.get('mask_alu_per_weight', '-')} unpack/w={r.get('unpack_per_weight', '-')} "
              f"{'HGMMA' if r['hgmma'] else ''} {cfgs}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
