"""Does a second batch in flight fill the GPU? Throughput of engines replayed one batch at a time
on one stream against two instances of the same engine replayed on two streams at once.

A batch-8 engine keeps the H200 busy by the profile's measure (busy time = wall time), but busy
is not full: the decoder's and the query selection's kernels (900 queries) fill a fraction of
the SMs. Two CUDA streams let the scheduler run one batch's small kernels beside the other
batch's large ones. Every engine's outputs are checked first: each instance, run on its own
stream beside the other, gives exactly what it gives alone.

    python bench/overlap.py --engines ENGINE_B8[,ENGINE_B16] [--iters 30] [--out FILE.md]

Each engine directory is timed at its largest batch size, alone (one stream) and as two
instances on two streams; images per second from CUDA events around the whole run.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch


def inputs(engine, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised random images and all-valid masks at the engine's largest batch size."""
    batch, (h, w) = max(engine.manifest.batch_sizes), engine.manifest.input_hw
    gen = torch.Generator("cuda").manual_seed(seed)
    images = torch.randn((batch, 3, h, w), device="cuda", generator=gen)
    return images, torch.zeros((batch, h, w), dtype=torch.bool, device="cuda")


def run(engines: list, batches: list, streams: list[torch.cuda.Stream], iters: int) -> float:
    """Milliseconds for `iters` rounds in which engine i runs batch i on stream i (queued
    back to back; the host never waits inside the round)."""
    main = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(main)
    for stream in streams:
        stream.wait_stream(main)
    for _ in range(iters):
        for engine, (images, masks), stream in zip(engines, batches, streams, strict=True):
            with torch.cuda.stream(stream):
                engine.infer(images, masks)
    for stream in streams:
        main.wait_stream(stream)
    end.record(main)
    end.synchronize()
    return start.elapsed_time(end)


def same_outputs(engines: list, batches: list, streams: list[torch.cuda.Stream]) -> bool:
    """Each engine's outputs on its stream, beside the others, equal its outputs alone."""
    alone = [engine.infer(*batch) for engine, batch in zip(engines, batches, strict=True)]
    together = []
    for engine, batch, stream in zip(engines, batches, streams, strict=True):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            together.append(engine.infer(*batch))
    torch.cuda.synchronize()
    return all(torch.equal(a, b) for want, got in zip(alone, together, strict=True)
               for a, b in zip(want, got, strict=True))


def measure(path: Path, iters: int, repeats: int) -> list[dict]:
    from codetr_stream.compile.engines import load_engine

    device = torch.device("cuda")
    engines = [load_engine(path, device), load_engine(path, device)]
    batch = max(engines[0].manifest.batch_sizes)
    batches = [inputs(engines[0], seed) for seed in (0, 1)]
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]
    equal = same_outputs(engines, batches, streams)
    layouts = {"one stream": (engines[:1], batches[:1], streams[:1]),
               "two streams, two instances": (engines, batches, streams)}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for layout in layouts.values():
        run(*layout, iters=3)  # warm-up
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for name, layout in layouts.items():
            times[name].append(run(*layout, iters=iters))
    rows = []
    for name, (used, _, _) in layouts.items():
        ms = statistics.median(times[name])
        rows.append({"engine": str(path), "batch": batch, "layout": name, "equal": equal,
                     "images_per_s": len(used) * iters * batch / ms * 1e3,
                     "ms_per_batch": ms / (len(used) * iters)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True,
                        help="comma-separated engine directories (codetr-stream compile)")
    parser.add_argument("--iters", type=int, default=30, help="batches per timed run and stream")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per layout (median)")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = [row for path in args.engines.split(",")
            for row in measure(Path(path), args.iters, args.repeats)]
    for row in rows:  # against the first engine alone
        row["ratio"] = row["images_per_s"] / rows[0]["images_per_s"]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {stamp}; "
             f"`python bench/overlap.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             f"; median of {args.repeats} runs of {args.iters} batches per stream. Outputs "
             "equal: each instance's outputs beside the other, against its outputs alone "
             "(bitwise). Ratio: images/s against the first row.", "",
             "| engine | batch | layout | outputs equal | images/s | ms per batch | ratio |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['engine']} | {r['batch']} | {r['layout']} | {'yes' if r['equal'] else 'NO'} "
              f"| {r['images_per_s']:.1f} | {r['ms_per_batch']:.2f} | {r['ratio']:.3f} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
