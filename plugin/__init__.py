"""Multi-scale deformable attention: one kernel for PyTorch and TensorRT."""

from codetr_stream.plugin.op import ms_deform_attn

__all__ = ["ms_deform_attn"]
