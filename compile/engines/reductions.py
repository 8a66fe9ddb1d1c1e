"""Inductor's persistent-or-looped choice for reduction kernels, made with the kernel's own hint.

A persistent reduction keeps a whole row in registers (a LayerNorm reads its row once); a looped
one walks the row in blocks (a LayerNorm reads it twice). Inductor (torch 2.11-2.13) decides
between them with a reduction hint computed *before* its tiling analysis, then emits the kernel
with the hint computed *after* it. A LayerNorm whose fused inputs include one read with a stride
(the encoder's add + LayerNorm over 256 channels at batch 8) gets DEFAULT at the decision,
whose persistent limit is 64 elements, and INNER in the kernel, whose limit is 1024: it is
looped, at ~1.6-2x its memory floor (bench/RESULTS.md, "Inductor options on the new default").
`KernelHintChoices` makes the decision with the emitted hint, through Inductor's supported hook
for heuristics (`InductorChoices`), and leaves every other decision to Inductor.

`compile_options()` names the class in the torch.compile options, which puts its `uuid` in the
key of Inductor's compile cache (a cached kernel from another choice is never served), and
`installed()` sets it as the compiling thread's handler (Inductor keeps the first handler a
thread used, whatever the options say later).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.codegen.simd_kernel_features import SIMDKernelFeatures
from torch._inductor.codegen.triton import TritonScheduling
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

# Inductor's persistent limit for INNER reductions (choices.py), which the emitted kernel carries.
INNER_PERSISTENT_LIMIT = 1024


class KernelHintChoices(InductorChoices):
    """Inductor's heuristics, with persistence decided by the hint the kernel is emitted with."""

    def uuid(self) -> str:
        return "codetr-stream-kernel-hint-1"

    @staticmethod
    def should_use_persistent_reduction(features: SIMDKernelFeatures,
                                        cooperative_reduction: bool) -> bool:
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        if (cooperative_reduction or not config.triton.persistent_reductions
                or features.get_reduction_hint() != ReductionHint.DEFAULT
                or not V.graph.sizevars.statically_known_leq(features.reduction_numel,
                                                             INNER_PERSISTENT_LIMIT)):
            return False
        # The scores the kernel's code generation computes for the same nodes.
        _, scores = TritonScheduling.get_tiling_and_scores(
            features.node_schedule, features.numel, features.reduction_numel,
            features.coalesce_analysis)
        return features.get_reduction_hint(scores) == ReductionHint.INNER


def compile_options() -> dict[str, Any]:
    """The torch.compile option that selects `KernelHintChoices` (and keys the cache by it)."""
    return {"inductor_choices_class": KernelHintChoices}


@contextmanager
def installed() -> Iterator[None]:
    """`KernelHintChoices` as this thread's Inductor heuristics while the block compiles."""
    with V.set_choices_handler(KernelHintChoices()):
        yield
