"""Backend "tensorrt": the exported program compiled by Torch-TensorRT into plain TensorRT plans.

Build (needs torch_tensorrt): one static-shape program per batch size goes through
`torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine`, which turns the whole
graph into ONE engine or fails: there is no PyTorch fallback segment to hide an unsupported op.
MSDA reaches TensorRT through the AOT plugin of `codetr_stream.plugin.tensorrt_plugin` (its
`register()` runs before the build). FP16: the program is exported with FP16 matrix weights
under autocast (precision.py), so the network is strongly typed the way the PyTorch engines run;
older Torch-TensorRT without explicit typing gets `enabled_precisions` instead.

Run (needs only `tensorrt` and torch): `engine_b{N}.plan` is deserialized with
`tensorrt.Runtime`, bound to torch tensors by name and enqueued on the current torch stream. The
plugin's kernel is embedded in the plan as PTX, so loading registers nothing and needs neither
Torch-TensorRT nor Triton.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from codetr_stream.compile.engines.base import Engine, Outputs
from codetr_stream.compile.engines.eager import save_config
from codetr_stream.compile.engines.manifest import Manifest
from codetr_stream.compile.engines.precision import PrecisionWrapper
from codetr_stream.compile.export import INPUT_NAMES, OUTPUT_NAMES, example_inputs, export_model
from torch import Tensor, nn

log = logging.getLogger(__name__)

PLUGIN_MODULE = "codetr_stream.plugin.tensorrt_plugin"


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or Torch-TensorRT for building) cannot be imported here."""


def import_tensorrt() -> Any:
    """`tensorrt` (all that running a plan needs), or a one-line reason why not."""
    try:
        import tensorrt
    except ImportError as exc:  # the package index here only has download stubs, see NOTES
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}); use --backend inductor, "
                                  "or install TensorRT >= 10.9 for this CUDA") from exc
    return tensorrt


def _import_torch_tensorrt() -> Any:
    """`torch_tensorrt` with the MSDA plugin and its converter registered (building only)."""
    import_tensorrt()
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"building TensorRT engines needs torch_tensorrt ({exc}); "
                                  "it is not needed to run them") from exc
    try:
        importlib.import_module(PLUGIN_MODULE).register()
    except ImportError as exc:
        raise TensorRTUnavailable(f"the MSDA TensorRT plugin ({PLUGIN_MODULE}) does not load: "
                                  f"{exc}") from exc
    return torch_tensorrt


def _convert_options(convert: Any, precision: str, device: torch.device) -> dict[str, Any]:
    """Options of the installed Torch-TensorRT: whole graph, no fallback, the engine precision.

    `device` is explicit: some releases default it to the current device at import time.
    """
    accepted = inspect.signature(convert).parameters
    options: dict[str, Any] = {"require_full_compilation": True, "min_block_size": 1,
                               "device": device}
    if "use_explicit_typing" in accepted:
        options["use_explicit_typing"] = True  # dtypes as exported: FP16 weights + autocast
    elif precision == "fp16":
        options["enabled_precisions"] = {torch.float16, torch.float32}
    return {k: v for k, v in options.items() if k in accepted}


def build(model: nn.Module, out_dir: Path, manifest: Manifest, device: torch.device) -> None:
    """One serialized plan per batch size (static shapes)."""
    if device.type != "cuda":
        raise TensorRTUnavailable("TensorRT engines are built on a CUDA GPU; none is visible")
    torch_tensorrt = _import_torch_tensorrt()
    convert = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine
    options = _convert_options(convert, manifest.precision, device)
    save_config(out_dir, manifest)
    program_model = PrecisionWrapper(copy.deepcopy(model), device, manifest.precision)
    for b in manifest.batch_sizes:
        program = export_model(program_model, manifest.input_hw, b, device)
        inputs = list(example_inputs(b, manifest.input_hw, device))
        with torch.cuda.device(device):  # the plugin compiles its kernel for this GPU
            plan = convert(program, arg_inputs=inputs, **options)
        name = f"engine_b{b}.plan"
        (out_dir / name).write_bytes(bytes(plan))
        manifest.files[f"plan_b{b}"] = name
    manifest.notes.append(f"Torch-TensorRT {torch_tensorrt.__version__} options: "
                          f"{sorted(options)}")


class _Plan:
    """One deserialized plan with its execution context and preallocated outputs."""

    def __init__(self, trt: Any, runtime: Any, path: Path, device: torch.device) -> None:
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the plan (built for "
                               "another TensorRT or GPU? rebuild it)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if len(self.input_names) != len(INPUT_NAMES) or len(self.output_names) != len(
                OUTPUT_NAMES):
            raise RuntimeError(f"{path}: plan has inputs {self.input_names} and outputs "
                               f"{self.output_names}, expected 2 and 3")
        self.outputs = [
            torch.empty(tuple(self.engine.get_tensor_shape(n)), device=device,
                        dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(n)))
            for n in self.output_names]
        if sorted(self.input_names) == sorted(INPUT_NAMES):  # Torch-TensorRT keeps the names
            self.input_names = list(INPUT_NAMES)
        for name, tensor in zip(self.output_names, self.outputs, strict=True):
            self._bind(name, tensor)

    def _bind(self, name: str, tensor: Tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of {name!r}")

    def __call__(self, images: Tensor, masks: Tensor) -> Outputs:
        images, masks = images.contiguous(), masks.contiguous()
        for name, tensor in zip(self.input_names, (images, masks), strict=True):
            self._bind(name, tensor)
        stream = torch.cuda.current_stream(images.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        boxes, scores, labels = (o.clone() for o in self.outputs)
        return boxes.float(), scores.float(), labels.long()


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool}
    return table[dtype]


class TensorRTEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest, device: torch.device) -> None:
        super().__init__(path, manifest, device)
        trt = import_tensorrt()
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            self._plans = {b: _Plan(trt, runtime, self.path / manifest.files[f"plan_b{b}"],
                                    device) for b in manifest.batch_sizes}

    def _run(self, images: Tensor, masks: Tensor) -> Outputs:
        return self._plans[images.shape[0]](images, masks)


def load(path: Path, manifest: Manifest, device: torch.device) -> TensorRTEngine:
    if device.type != "cuda":
        raise TensorRTUnavailable("TensorRT engines run on a CUDA GPU; none is visible")
    return TensorRTEngine(path, manifest, device)
