"""Instruction counts of the MSDA kernels' inner loop, compiled for sm_90 on any machine (no GPU).

    python bench/msda_sass.py [--capability 90] [--out FILE.md]

Triton compiles each variant at the Co-DINO encoder shape (head dim 32, 5 levels, 4 points) to a
cubin with the ptxas in Triton's wheel; nvdisasm lists its SASS. The level loop's body is the
kernel's steady state: its instructions per gathered element (one fp16/fp32 value of one corner
row) times the encoder call's 1.51 G gathered elements over the GPU's issue rate (132 SMs x 4
warp-instructions a clock at 1.98 GHz on H100 SXM / H200) is the time the call needs if issue
bound. Used for bench/msda_notes.md; the device run (bench/msda.py) measures the real times.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from codetr_stream.plugin.kernel import LaunchConfig, msda_fwd_kernel
from msda_baselines import msda_fwd_kernel_v3
from triton.backends.compiler import GPUTarget

DIM, LEVELS, POINTS = 32, 5, 4
ENCODER_ELEMENTS = 73_656 * 8 * LEVELS * POINTS * 4 * DIM  # gathered elements, batch 1
ISSUE_RATE = 132 * 4 * 1.98e9  # warp-instructions per second (H100 SXM, H200)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ITEMSIZE = {"fp16": 2, "fp32": 4}
# name: (kernel, value dtype, locations/weights dtype, launch config or None for v3)
VARIANTS = {
    "v3 fp16": (msda_fwd_kernel_v3, "fp16", "fp16", None),
    "v3 fp32": (msda_fwd_kernel_v3, "fp32", "fp32", None),
    "lanes4 fp16": (msda_fwd_kernel, "fp16", "fp16", LaunchConfig(32, 4, 4)),
    "lanes2 fp16": (msda_fwd_kernel, "fp16", "fp16", LaunchConfig(64, 2, 4)),
    "lanes1 fp16": (msda_fwd_kernel, "fp16", "fp16", LaunchConfig(128, 1, 4)),
    "lanes2 half_bilinear fp16": (msda_fwd_kernel, "fp16", "fp16", LaunchConfig(64, 2, 4, True)),
    "lanes2 fp16 value, fp32 locations": (msda_fwd_kernel, "fp16", "fp32", LaunchConfig(64, 2, 4)),
    "lanes2 fp32": (msda_fwd_kernel, "fp32", "fp32", LaunchConfig(64, 2, 4)),
    "lanes1 fp32": (msda_fwd_kernel, "fp32", "fp32", LaunchConfig(128, 1, 4)),
}


def compile_variant(fn, value: str, locs: str, config: LaunchConfig | None, capability: int):
    """(compiled kernel, queries a program, warps) at the encoder shape."""
    if config is None:  # v3: 32 queries x 32 channels, 4 warps (msda_baselines defaults)
        block_q, warps, extra = 32, 4, {"BLOCK_Q": 32, "BLOCK_D": 32}
    else:
        block_q, warps = config.block_q, config.num_warps
        extra = config.constexprs(DIM, ITEMSIZE[value])
    signature = {"value_ptr": f"*{value}", "shapes_ptr": "*i64", "starts_ptr": "*i64",
                 "loc_ptr": f"*{locs}", "attw_ptr": f"*{locs}", "num_tokens": "i32",
                 "num_queries": "i32", "num_heads": "i32", "out_ptr": f"*{value}"}
    constexprs = {"DIM": DIM, "LEVELS": LEVELS, "POINTS": POINTS, **extra}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                       attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": warps})
    return compiled, block_q, warps


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    args = parser.parse_args()
    rows = ["| variant | regs | loop instr. | elements | instr./element | issue-bound us | "
            "top opcodes |", "|---|---|---|---|---|---|---|"]
    for name, (fn, value, locs, config) in VARIANTS.items():
        compiled, block_q, warps = compile_variant(fn, value, locs, config, args.capability)
        ops, regs = loop_mix(compiled.asm["cubin"])
        total = sum(ops.values())
        elements = block_q * POINTS * 4 * DIM // (warps * 32)  # per lane per level iteration
        per_element = total / elements
        issue_us = 1e6 * per_element * ENCODER_ELEMENTS / 32 / ISSUE_RATE
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
        rows.append(f"| {name} | {regs} | {total} | {elements} | {per_element:.2f} | "
                    f"{issue_us:.0f} | {top} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\nsm_{args.capability}, triton {triton.__version__}, "
          f"`python bench/msda_sass.py {' '.join(sys.argv[1:])}`\n\n{table}")
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
