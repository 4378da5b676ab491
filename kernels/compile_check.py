"""Compile every Triton kernel for Hopper (sm_90) and Ampere (sm_80) without a GPU, and check what it needs.

Each kernel is compiled with Triton's own compiler at the tiles, warps and argument types it is launched with on
a GPU (BERT-sized rows: V = 30,522, H = 768 and a multi-tile H), then its cubin's resource usage is read with the
cuobjdump that ships with Triton. A kernel fails when it spills (local memory or stack per thread), needs more
registers than a thread or a block may have, or more shared memory than the chip gives a block.

    python -m kernels.compile_check [--arch 90,80]

prints the resource table and exits 1 when any kernel fails. Run it with TRITON_INTERPRET unset: the
interpreter replaces the kernels with Python functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import cosine, kd_mlm

# Shared memory a block may use (opt-in maximum) and registers per SM, by compute capability.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
REGS_PER_SM = 65536
MAX_REGS_PER_THREAD = 255
_ALIGNED = [["tt.divisibility", 16]]  # what the JIT records for 16-byte aligned pointers and strides
_TYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


@dataclass
class Case:
    """One launch configuration: a kernel, its argument types and its compile-time constants."""

    what: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int


@dataclass
class Usage:
    case: str
    arch: int
    regs: int
    local: int
    stack: int
    shared: int
    problems: list[str]


def _jit(kernel):
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise SystemExit("kernels.compile_check: unset TRITON_INTERPRET; the interpreter's kernels cannot be compiled")
    return kernel


def kd_mlm_cases(vocab: int = 30522) -> list[Case]:
    """The row kernel as linear_kd_mlm_loss (fp32 logits buffers) and kd_mlm_loss (logits as given) launch it."""
    block_v, warps = kd_mlm.tile(vocab, on_gpu=True)
    launches = [  # (what, logits dtype, g dtype or None, fold mlm into g, compact mlm gradient)
        ("kd_mlm rows: fp32 heads, g in place, folded", "fp32", "fp32", True, False),
        ("kd_mlm rows: bf16 heads, g bf16, folded", "fp32", "bf16", True, False),
        ("kd_mlm rows: fp16 heads, g fp16, folded", "fp32", "fp16", True, False),
        ("kd_mlm rows: two sums (g + compact g_mlm)", "fp32", "fp32", False, True),
        ("kd_mlm rows: bf16 logits, kd_mlm_loss", "bf16", "fp32", False, True),
        ("kd_mlm rows: bf16 logits, values only", "bf16", None, False, False),
    ]
    cases = []
    for what, logits, g, fold, compact in launches:
        signature = {
            "s_ptr": _TYPES[logits],
            "t_ptr": _TYPES[logits],
            "labels_ptr": "*i64",
            "kd_coef_ptr": "*fp32",
            "mlm_coef_ptr": "*fp32",
            "kl_ptr": "*fp32",
            "ce_ptr": "*fp32",
            "g_ptr": _TYPES[g or "fp32"],
            "g_mlm_ptr": "*fp32",
            "slot_ptr": "*i64",
            "s_stride": "i32",
            "t_stride": "i32",
            "g_stride": "i32",
            "g_mlm_stride": "i32",
            "V": "i32",
            "inv_temp": "fp32",
            "g_scale": "fp32",
        }
        flags = {"WRITE_G": g is not None, "FOLD_MLM": fold, "WRITE_MLM": compact, "BLOCK_V": block_v}
        cases.append(Case(what, _jit(kd_mlm._kd_mlm_rows_kernel), signature, flags, warps))
    return cases


def cosine_cases() -> list[Case]:
    cases = []
    for hidden, dtype in ((768, "bf16"), (768, "fp32"), (16384, "fp32")):
        block_h, warps = cosine.tile(hidden, on_gpu=True)
        signature = {
            "hs_ptr": _TYPES[dtype],
            "ht_ptr": _TYPES[dtype],
            "coef_ptr": "*fp32",
            "loss_ptr": "*fp32",
            "grad_ptr": "*fp32",
            "hs_stride": "i32",
            "ht_stride": "i32",
            "grad_stride": "i32",
            "H": "i32",
            "eps": "fp32",
        }
        flags = {"NEED_GRAD": True, "ONE_TILE": hidden <= block_h, "BLOCK_H": block_h}
        tiles = "one tile" if hidden <= block_h else "two sweeps"
        cases.append(Case(f"cosine rows: H={hidden} {dtype}, {tiles}", _jit(cosine._cosine_rows_kernel), signature,
                          flags, warps))  # fmt: skip
    return cases


def _attrs(case: Case) -> dict:
    """16-byte alignment for every pointer and stride, as the JIT sees for padded buffers; V = 30,522 is not."""
    names = case.kernel.arg_names
    return {
        (names.index(name),): _ALIGNED
        for name, kind in case.signature.items()
        if kind.startswith("*") or name.endswith("_stride")
    }


def _cuobjdump(cubin: bytes) -> dict[str, int]:
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def check(case: Case, arch: int) -> Usage:
    """Compile `case` for sm_`arch` and judge its resource usage."""
    signature = dict(case.signature)
    signature.update({name: "constexpr" for name in case.constexprs})
    src = ASTSource(case.kernel, signature, constexprs=case.constexprs, attrs=_attrs(case))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps})
    res = _cuobjdump(compiled.asm["cubin"])
    shared = res["SHARED"] + compiled.metadata.shared
    threads = 32 * case.num_warps
    problems = []
    if res["LOCAL"] or res["STACK"]:
        problems.append(f"spills ({res['LOCAL']} B local, {res['STACK']} B stack per thread)")
    if res["REG"] > MAX_REGS_PER_THREAD or res["REG"] * threads > REGS_PER_SM:
        problems.append(f"{res['REG']} registers x {threads} threads do not fit")
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"{shared} B shared memory > {SHARED_LIMIT[arch]} B")
    return Usage(case.what, arch, res["REG"], res["LOCAL"], res["STACK"], shared, problems)


def format_table(rows: list[Usage]) -> str:
    head = f"{'kernel launch':<46}{'arch':>6}{'regs':>6}{'local B':>9}{'stack B':>9}{'shared B':>10}  verdict"
    lines = [head, "-" * len(head)]
    for u in rows:
        verdict = "ok" if not u.problems else "FAIL: " + "; ".join(u.problems)
        arch = f"sm_{u.arch}"
        lines.append(f"{u.case:<46}{arch:>6}{u.regs:>6}{u.local:>9}{u.stack:>9}{u.shared:>10}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="comma list of compute capabilities (default 90,80)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.compile_check: unset TRITON_INTERPRET to compile the kernels", file=sys.stderr)
        return 2
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch must be a comma list of integers like 90,80, got {args.arch!r}")
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        parser.error(f"--arch: no shared-memory limit known for {unknown}; known: {sorted(SHARED_LIMIT)}")
    rows = [check(case, arch) for arch in archs for case in kd_mlm_cases() + cosine_cases()]
    print(f"Triton {triton.__version__}: every kernel launch compiled for {', '.join(f'sm_{a}' for a in archs)}")
    print(format_table(rows))
    failed = [u for u in rows if u.problems]
    print(f"{len(rows) - len(failed)} of {len(rows)} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
