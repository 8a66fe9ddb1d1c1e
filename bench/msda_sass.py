"""Instruction counts of the MSDA kernels' inner loop, compiled for sm_90 on any machine (no GPU).

    python bench/msda_sass.py [--capability 90] [--out FILE.md]

Triton compiles each variant at the Co-DINO encoder shape (head dim 32, 5 levels, 4 points) to a
cubin with the ptxas in Triton's wheel; nvdisasm lists its SASS. The level loop's body is the
kernel's steady state: its instructions per gathered element (one fp16/fp32 value of one corner
row) times the encoder call's 1.51 G gathered elements over the GPU's issue rate (132 SMs x 4
warp-instructions a clock at 1.98 GHz on H100 SXM / H200) is the time the call needs if issue
bound. Used for bench/msda_notes.md; the device run (bench/msda.py) measures the real times.

The "op" and "offsets" rows compare, at the op's launch config, `msda_fwd_kernel` reading FP32
locations/weights with `msda_offsets_fwd_kernel` making them from FP16 offsets/logits and an
FP32 reference (points: encoder, boxes: decoder; both rows use the encoder's element count). The
offsets kernel's softmax max/sum runs before the loop and is not counted. Shared memory (the
"shared bytes" column, BAR/LDS/STS always listed) means Triton converts layouts in the kernel.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from codetr_stream.plugin.kernel import (
    LaunchConfig,
    launch_config,
    msda_fwd_kernel,
    msda_offsets_fwd_kernel,
)
from msda_baselines import msda_fwd_kernel_v3
from triton.backends.compiler import GPUTarget
from triton.compiler import CompiledKernel
from triton.runtime.jit import JITFunction

DIM, LEVELS, POINTS = 32, 5, 4
ENCODER_ELEMENTS = 73_656 * 8 * LEVELS * POINTS * 4 * DIM  # gathered elements, batch 1
ISSUE_RATE = 132 * 4 * 1.98e9  # warp-instructions per second (H100 SXM, H200)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ITEMSIZE = {"fp16": 2, "fp32": 4}
SHARED_OPS = ("BAR", "LDS", "STS")  # listed even outside the top opcodes
SCALARS = {"num_tokens": "i32", "num_queries": "i32", "num_heads": "i32"}


@dataclass(frozen=True)
class Variant:
    """A kernel with the argument types and block shape to compile it at."""

    fn: JITFunction
    signature: dict[str, str]  # runtime arguments in the kernel's order: Triton type
    constexprs: dict[str, int | bool]  # besides DIM, LEVELS, POINTS
    block_q: int
    num_warps: int


def op_variant(value: str, locs: str, config: LaunchConfig | None,
               head_major: bool = False) -> Variant:
    """`msda_fwd_kernel` at `config` (reading a head-major value if asked), or v3 (its
    baseline, same arguments) where config is None."""
    signature = {"value_ptr": f"*{value}", "shapes_ptr": "*i64", "starts_ptr": "*i64",
                 "loc_ptr": f"*{locs}", "attw_ptr": f"*{locs}", **SCALARS,
                 "out_ptr": f"*{value}"}
    if config is None:  # 32 queries x 32 channels, 4 warps (msda_baselines defaults)
        return Variant(msda_fwd_kernel_v3, signature, {"BLOCK_Q": 32, "BLOCK_D": 32}, 32, 4)
    return Variant(msda_fwd_kernel, signature,
                   config.constexprs(DIM, ITEMSIZE[value], head_major), config.block_q,
                   config.num_warps)


def offsets_variant(value: str, inputs: str, ref_dims: int, config: LaunchConfig) -> Variant:
    """`msda_offsets_fwd_kernel` at `config` (which has no HALF_BILINEAR)."""
    signature = {"value_ptr": f"*{value}", "shapes_ptr": "*i64", "starts_ptr": "*i64",
                 "ref_ptr": "*fp32", "offsets_ptr": f"*{inputs}", "logits_ptr": f"*{inputs}",
                 **SCALARS, "offsets_row_stride": "i32", "logits_row_stride": "i32",
                 "out_ptr": f"*{value}"}
    constexprs = config.constexprs(DIM, ITEMSIZE[value])
    del constexprs["HALF_BILINEAR"], constexprs["HEAD_MAJOR"]
    return Variant(msda_offsets_fwd_kernel, signature, {"REF_DIMS": ref_dims, **constexprs},
                   config.block_q, config.num_warps)


OP = launch_config()
VARIANTS = {
    "v3 fp16": op_variant("fp16", "fp16", None),
    "v3 fp32": op_variant("fp32", "fp32", None),
    "lanes4 fp16": op_variant("fp16", "fp16", LaunchConfig(32, 4, 4)),
    "lanes4 head-major fp16": op_variant("fp16", "fp16", LaunchConfig(32, 4, 4), head_major=True),
    "lanes2 fp16": op_variant("fp16", "fp16", LaunchConfig(64, 2, 4)),
    "lanes1 fp16": op_variant("fp16", "fp16", LaunchConfig(128, 1, 4)),
    "lanes2 half_bilinear fp16": op_variant("fp16", "fp16", LaunchConfig(64, 2, 4, True)),
    "lanes2 fp16 value, fp32 locations": op_variant("fp16", "fp32", LaunchConfig(64, 2, 4)),
    "lanes2 fp32": op_variant("fp32", "fp32", LaunchConfig(64, 2, 4)),
    "lanes1 fp32": op_variant("fp32", "fp32", LaunchConfig(128, 1, 4)),
    f"op {OP.block_q}q/{OP.lanes_per_row}l/{OP.num_warps}w fp16 value, fp32 locations":
        op_variant("fp16", "fp32", OP),
    "offsets fp16 points": offsets_variant("fp16", "fp16", 2, OP),
    "offsets fp16 boxes": offsets_variant("fp16", "fp16", 4, OP),
}


def compile_variant(variant: Variant, capability: int) -> CompiledKernel:
    """The variant's compiled kernel at the encoder shape, pointers assumed 16-byte aligned."""
    constexprs = {"DIM": DIM, "LEVELS": LEVELS, "POINTS": POINTS, **variant.constexprs}
    signature = {**variant.signature, **dict.fromkeys(constexprs, "constexpr")}
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    source = triton.compiler.ASTSource(fn=variant.fn, signature=signature, constexprs=constexprs,
                                       attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": variant.num_warps})


def loop_mix(cubin: bytes) -> tuple[collections.Counter, int]:
    """Opcode counts of the largest loop body (the level loop) and the register count."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([BIN / "nvdisasm", "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^(\.L_x_\d+):", line))}
    body: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > len(body):
            body = lines[labels[m.group(1)]:i + 1]
    ops = collections.Counter()
    opcode = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[0-9T] )?([A-Z0-9_]+)((?:\.[A-Z0-9_]+)*)")
    for line in body:
        m = opcode.search(line)
        if m:
            ops[m.group(1) + (".128" if ".128" in m.group(2) else "")] += 1
    regs = re.search(r"REG:(\d+)", usage)
    return ops, int(regs.group(1)) if regs else -1


def top_opcodes(ops: collections.Counter, count: int = 8) -> str:
    """The `count` most frequent opcodes, then any shared-memory ones that did not make it."""
    shown = dict(ops.most_common(count))
    shown.update((op, n) for op, n in ops.items() if op.split(".")[0] in SHARED_OPS)
    return ", ".join(f"{op} {n}" for op, n in shown.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    args = parser.parse_args()
    rows = ["| variant | regs | shared bytes | loop instr. | elements | instr./element | "
            "issue-bound us | top opcodes |", "|---|---|---|---|---|---|---|---|"]
    for name, variant in VARIANTS.items():
        compiled = compile_variant(variant, args.capability)
        ops, regs = loop_mix(compiled.asm["cubin"])
        total = sum(ops.values())
        elements = variant.block_q * POINTS * 4 * DIM // (variant.num_warps * 32)  # a lane, level
        per_element = total / elements
        issue_us = 1e6 * per_element * ENCODER_ELEMENTS / 32 / ISSUE_RATE
        rows.append(f"| {name} | {regs} | {compiled.metadata.shared} | {total} | {elements} | "
                    f"{per_element:.2f} | {issue_us:.0f} | {top_opcodes(ops)} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\nsm_{args.capability}, triton {triton.__version__}, "
          f"`python bench/msda_sass.py {' '.join(sys.argv[1:])}`\n\n{table}")
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
