"""The engines fastdw is measured against, each built from one eager PyTorch model.

An engine builder takes the eager model (eval mode, calibrated statistics) and an example input
and returns a callable running inference on that input, or raises ``Skipped`` with the reason
(library not installed, export failed, disabled on the command line). Every engine gets the same
thread count and flushes denormals. Third-party runtimes are asked for float32 (OpenVINO would
otherwise pick bfloat16 on CPUs that have it) and for no busy-waiting worker threads, which would
steal the cores from whichever engine runs next in the interleaved timing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

Fn = Callable[[], object]


class Skipped(Exception):
    """An engine that cannot run here; the message says why (shown in the report)."""


@dataclass
class Settings:
    """What every engine builder needs besides the model: threads, a scratch folder, switches."""

    threads: int = 2
    workdir: str = os.path.join("bench", "results", "tmp")
    compile: bool = True
    onnx: bool = True


# ---- eager PyTorch ---------------------------------------------------------------------------------


def channels_last(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A channels_last copy of the model and of its input."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last), x.contiguous(
        memory_format=torch.channels_last)


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def fold_bn(model: nn.Module) -> int:
    """Fold, in place, every ``Conv2d`` directly followed by a ``BatchNorm2d`` inside a Sequential
    (torchvision's ``Conv2dNormActivation`` and ShuffleNetV2's flat branches) into the conv, leaving
    an ``Identity`` where the BN was; eval mode only. Returns how many were folded.

    This is "eager with BN folded": what a user gets from PyTorch alone before inference, without
    fastdw or a compiler.
    """
    if model.training:
        raise ValueError("fold_bn needs a model in eval mode (it uses the running statistics)")
    count = 0
    for m in model.modules():
        if not _plain_sequential(m):
            continue
        names = list(m._modules)
        for a, b in zip(names[:-1], names[1:], strict=True):
            conv, bn = m._modules[a], m._modules[b]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
                    and bn.num_features == conv.out_channels):
                m._modules[a] = fuse_conv_bn_eval(conv, bn)
                m._modules[b] = nn.Identity()
                count += 1
    return count


def eager(model: nn.Module, x: torch.Tensor, settings: Settings) -> Fn:
    return lambda: model(x)


def eager_cl(model: nn.Module, x: torch.Tensor, settings: Settings) -> Fn:
    m, xc = channels_last(model, x)
    return lambda: m(xc)


def folded_cl(model: nn.Module, x: torch.Tensor, settings: Settings) -> Fn:
    m, xc = channels_last(model, x)
    if fold_bn(m) == 0:
        raise Skipped("no Conv2d -> BatchNorm2d pair to fold")
    return lambda: m(xc)


# ---- torch.compile -----------------------------------------------------------------------------------


def compile_inference(fn: Callable[..., object], *example: torch.Tensor) -> Callable[..., object]:
    """``torch.compile`` (inductor, default mode) with freezing (weights become constants, BN is
    folded, oneDNN weight layouts prepacked), compiled now on ``example`` under ``no_grad``."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # every model / layer is a new graph: no cache-size limit to run into
    compiled = torch.compile(fn, dynamic=False)
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled(*example)
    return compiled


def compile_training(fn: Callable[..., object]) -> Callable[..., object]:
    """``torch.compile`` (inductor, default mode) for forward + backward; compiled on first call."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def compiled(model: nn.Module, x: torch.Tensor, settings: Settings) -> Fn:
    if not settings.compile:
        raise Skipped("--no-compile")
    try:
        fn = compile_inference(model, x)
    except Exception as e:  # a compiler failure is a result to report, not a crash of the run
        raise Skipped(f"torch.compile failed: {_short(e)}") from e
    return lambda: fn(x)


# ---- ONNX Runtime and OpenVINO -------------------------------------------------------------------------


def export_onnx(model: nn.Module, x: torch.Tensor, path: str) -> str:
    """Export to ONNX with a dynamic batch dimension, trying the dynamo exporter first and
    TorchScript tracing second; returns which exporter worked. Raises ``Skipped`` with both reasons
    if neither does."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    errors = []
    for dynamo in (True, False):
        if dynamo:
            options = {"external_data": False,
                       "dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=4096)},)}
        else:
            options = {"opset_version": 17, "dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}}
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=dynamo,
                                  **options)
            return "dynamo" if dynamo else "torchscript"
        except Exception as e:
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {_short(e)}")
    raise Skipped("ONNX export failed (" + "; ".join(errors) + ")")


class OnnxCache:
    """One ONNX file per model (dynamic batch), shared by ONNX Runtime and OpenVINO."""

    def __init__(self) -> None:
        self.paths: dict[str, str | Skipped] = {}
        self.exporter: dict[str, str] = {}

    def get(self, key: str, model: nn.Module, x: torch.Tensor, settings: Settings) -> str:
        if key not in self.paths:
            path = os.path.join(settings.workdir, f"{key}_{x.shape[-2]}x{x.shape[-1]}.onnx")
            try:
                self.exporter[key] = export_onnx(model, x, path)
                self.paths[key] = path
            except Skipped as e:
                self.paths[key] = e
        found = self.paths[key]
        if isinstance(found, Skipped):
            raise Skipped(str(found))
        return found


def onnxruntime(model: nn.Module, x: torch.Tensor, settings: Settings, onnx_path: Callable[[], str]) -> Fn:
    if not settings.onnx:
        raise Skipped("--no-onnx")
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Skipped("onnxruntime is not installed") from e
    path = onnx_path()
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: x.detach().contiguous().numpy()}
    return lambda: sess.run(None, feed)[0]


def openvino(model: nn.Module, x: torch.Tensor, settings: Settings, onnx_path: Callable[[], str]) -> Fn:
    if not settings.onnx:
        raise Skipped("--no-onnx")
    try:
        import openvino as ov
    except ImportError as e:
        raise Skipped("openvino is not installed") from e
    core = ov.Core()
    try:
        ov_model = core.read_model(onnx_path())
        ov_model.reshape({0: list(x.shape)})  # static shapes, as every other engine gets
    except Skipped:  # no ONNX file: OpenVINO's own PyTorch frontend
        try:
            with torch.no_grad():
                ov_model = ov.convert_model(model, example_input=x)
        except Exception as e:
            raise Skipped(f"openvino.convert_model failed: {_short(e)}") from e
    config = {
        "INFERENCE_NUM_THREADS": settings.threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    try:
        compiled_model = core.compile_model(ov_model, "CPU", {**config, "CPU_DENORMALS_OPTIMIZATION": True})
    except RuntimeError:  # a CPU plugin without that property
        compiled_model = core.compile_model(ov_model, "CPU", config)
    request = compiled_model.create_infer_request()
    feed = {0: x.detach().contiguous().numpy()}

    def run() -> object:
        request.infer(feed)
        return request.get_output_tensor(0).data

    return run


def to_tensor(out: object) -> torch.Tensor:
    """An engine's output as a float32 torch tensor (numpy arrays from ORT / OpenVINO)."""
    if isinstance(out, torch.Tensor):
        return out.detach().float()
    import numpy as np

    return torch.from_numpy(np.array(out, copy=True)).float()


def _short(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
