"""Where and how models run: the device and precision, model inputs on that device, model preparation."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import _dynamo

from pipeline.images import Preprocess


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over a numpy batch without copying it. Batches from Ray Data and Arrow are
    read-only; the models only read their inputs, so torch's warning about that is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


@dataclass(frozen=True)
class Runtime:
    """Where and how models run; chosen once per process.

    Attributes:
        device: a torch device string.
        autocast_dtype: bf16/fp16 for autocast on GPU; None runs float32.
        channels_last: use the NHWC memory format (faster convolutions on tensor cores).
        compile: a ``torch.compile`` backend (``inductor``) for the models' heavy parts, or None.
    """

    device: str = "cpu"
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: str | None = None

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Inference mode plus autocast when a reduced precision is set."""
        device_type = torch.device(self.device).type
        with torch.inference_mode(), torch.autocast(
            device_type=device_type, dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            yield


def select_runtime(device: str = "auto", precision: str = "auto", compile: str | None = None) -> Runtime:
    """Picks the device and precision.

    Args:
        device: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on GPUs that support it, else fp16; float32 on CPU), ``fp32``,
            ``bf16`` or ``fp16``.
        compile: ``torch.compile`` backend for the models (``inductor``; None: eager). The first
            batch of each shape pays the compilation (tens of seconds); long jobs win it back.

    Raises:
        ValueError: unknown values, or CUDA asked for but not available.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is visible; use --device cpu")
    if not (device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    on_gpu = device.startswith("cuda")
    dtype: torch.dtype | None = None
    if precision == "auto" and on_gpu:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if compile is not None:
        if compile not in _dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"unknown torch.compile backend {compile!r}; e.g. inductor")
    return Runtime(device=device, autocast_dtype=dtype, channels_last=on_gpu, compile=compile)


def to_model_input(images: np.ndarray | torch.Tensor, preprocess: Preprocess, runtime: Runtime) -> torch.Tensor:
    """Turns a batch of resized uint8 images into a normalised float tensor on the model's device.

    The uint8 batch is what crosses to the device (4x less traffic than float32); the scaling and
    normalisation run there.

    Args:
        images: ``uint8`` array (batch, height, width, 3) already at ``preprocess.size``, or such a
            tensor (e.g. decoded on the GPU by :mod:`pipeline.device_decode`).
        preprocess: supplies mean and std.
        runtime: supplies the device and memory format.

    Raises:
        ValueError: not a uint8 (N, H, W, 3) batch, or not at ``preprocess.size``.
    """
    on_device = isinstance(images, torch.Tensor)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"expected a uint8 batch of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    if tuple(images.shape[1:3]) != tuple(preprocess.size):
        raise ValueError(f"images are {tuple(images.shape[1:3])} but the model expects {preprocess.size}; resize first")
    if on_device:  # decoded on the device already (pipeline.device_decode)
        tensor = images.to(runtime.device)
    else:
        tensor = host_tensor(images)
        if runtime.device != "cpu":
            tensor = tensor.pin_memory().to(runtime.device, non_blocking=True)
    mean = torch.tensor(preprocess.mean, device=tensor.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocess.std, device=tensor.device).view(1, 3, 1, 1) * 255.0
    x = (tensor.permute(0, 3, 1, 2).float() - mean) / std
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


def prepare_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Readies a loaded model for inference under ``runtime``: eval mode, on its device, in its memory
    format, and with its heavy parts compiled when ``runtime.compile`` names a backend.

    Args:
        model: a timm, open_clip or torchvision model.
        runtime: device, memory format and compile backend.

    Returns:
        The same model object, prepared.
    """
    model = model.eval().to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if runtime.compile:
        # The backbone parts every path calls (the fused classify+embed pass calls
        # forward_features directly); the small heads stay eager.
        for name in ("forward_features", "encode_image", "encode_text"):
            if hasattr(model, name):
                setattr(model, name, torch.compile(getattr(model, name), backend=runtime.compile))
    return model
