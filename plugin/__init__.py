"""Multi-scale deformable attention: one kernel for PyTorch and TensorRT."""
