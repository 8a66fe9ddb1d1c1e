"""The generated source of an Inductor engine's kernels, read from its saved compiled graph.

A profile names kernels (`triton_per_fused__to_copy_clone_native_group_norm_35`); what they
compute, and over which shapes, is in the code Inductor generated, which the engine keeps in
`inductor_b{N}.bin` as plain text. This prints a kernel's definition and the lines of the
graph's `call` that launch it (their buffers and sizes), with no GPU and no compile:

    python bench/kernel_source.py ENGINE_DIR --batch 8 --list
    python bench/kernel_source.py ENGINE_DIR --batch 8 NAME [NAME ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# A kernel's definition: `NAME = async_compile.triton('NAME', '''...''', ...)` on CUDA,
# `NAME = async_compile.cpp_pybinding([...], r'''...''')` on the CPU.
DEFINITION = re.compile(r"^(\w+) = async_compile\.\w+\(", re.MULTILINE)


def generated_code(engine_dir: Path, batch: int) -> str:
    """The text of batch `batch`'s saved compiled graph (its binary framing kept as is)."""
    path = engine_dir / f"inductor_b{batch}.bin"
    if not path.is_file():
        sizes = sorted(p.name for p in engine_dir.glob("inductor_b*.bin"))
        raise SystemExit(f"{path}: no such file (this engine has: {', '.join(sizes) or 'none'})")
    return path.read_bytes().decode("latin-1")


def kernel_names(code: str) -> list[str]:
    """Every kernel the graph defines, in definition order (each once)."""
    return list(dict.fromkeys(DEFINITION.findall(code)))


def resolve(names: list[str], name: str) -> str:
    """`name`, or the one of `names` that starts with it (profiles cut long names short)."""
    if name in names:
        return name
    matches = [n for n in names if n.startswith(name)]
    if not matches:
        raise KeyError(f"{name}: not defined")
    if len(matches) > 1:
        more = f" and {len(matches) - 3} more" if len(matches) > 3 else ""
        raise KeyError(f"{name}: matches {', '.join(matches[:3])}{more}")
    return matches[0]


def kernel_source(code: str, name: str) -> str:
    """`name`'s definition (through the end of its source string), the lines that launch it
    and the lines that make their buffers."""
    start = code.find(f"\n{name} = async_compile.")
    if start < 0:
        raise KeyError(name)
    opening = code.index("'''", start)
    closing = code.index("'''", opening + 3)
    definition = code[start + 1:code.index("\n", closing)]
    lines = code.splitlines()
    launches = sorted({line.strip() for line in lines
                       if re.search(rf"\b{re.escape(name)}\b(\.run)?\(", line)
                       and "async_compile" not in line})
    buffers = set(re.findall(r"\bbuf\d+\b", "\n".join(launches)))
    assignment = re.compile(r"\s*(buf\d+) = (?!reader\.)")  # not the repro's storage reads
    allocations = sorted({line.strip() for line in lines
                          if (m := assignment.match(line)) and m[1] in buffers})
    return (definition + "\n\n# launched as:\n" + "\n".join(launches)
            + "\n# its buffers (allocations and reuses):\n" + "\n".join(allocations))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path, help="engine directory (codetr-stream compile)")
    parser.add_argument("names", nargs="*",
                        help="kernel names, as a profile prints them (a unique prefix will do)")
    parser.add_argument("--batch", type=int, default=1, help="which batch size's graph")
    parser.add_argument("--list", action="store_true", help="list the kernels the graph defines")
    args = parser.parse_intermixed_args(argv)
    code = generated_code(args.engine, args.batch)
    defined = kernel_names(code)
    if args.list or not args.names:
        print("\n".join(defined))
    status = 0
    for name in args.names:
        try:
            print(kernel_source(code, resolve(defined, name)), end="\n\n")
        except KeyError as exc:
            print(f"{exc.args[0]} in {args.engine}/inductor_b{args.batch}.bin (--list shows the "
                  "kernels it defines)", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
