"""Host→device input staging that overlaps the next batch's copy (or decode) with this batch's compute.

A model stage's call is split in two: *staging* (uint8 images pinned and copied to the device, or
JPEGs decoded there) and *compute* (the forward passes). Staging runs on a side CUDA stream of the
calling thread and ends with an event; compute waits for that event on the compute stream. When
two calls run at once in one actor (the job's model actors take two concurrent calls), one stages
while the other computes, and a lock keeps the computes one at a time, so device memory holds one
batch's activations plus the next batch's inputs.

On a CPU device everything here is a pass-through: same code, no streams, no copies.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import numpy as np
import torch

from pipeline.models.runtime import host_tensor

T = TypeVar("T")


class Staging:
    """Runs input work for a device on a per-thread side stream (CUDA) or inline (CPU).

    Args:
        device: the models' torch device.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._local = threading.local()

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)
        return stream

    def run(self, work: Callable[[], T]) -> tuple[T, torch.cuda.Event | None]:
        """Runs ``work`` (copies, decoding) on this thread's side stream.

        Returns:
            Its result and an event that marks the end of its device work (None on CPU).
        """
        if not self.cuda:
            return work(), None
        stream = self._stream()  # not ordered after the compute stream: that is the point
        with torch.cuda.stream(stream):
            result = work()
            event = stream.record_event()
        return result, event

    def to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A uint8 batch on the device: pinned, then copied without blocking the host (call inside :meth:`run`)."""
        if isinstance(array, torch.Tensor):
            return array.to(self.device, non_blocking=True)
        tensor = host_tensor(array)
        if not self.cuda:
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def ready(self, event: torch.cuda.Event | None, tensors: list[torch.Tensor]) -> None:
        """Makes the current (compute) stream wait for staged work before it reads ``tensors``.

        The tensors are also marked as used by the compute stream, so the caching allocator does not
        hand their memory to the side stream's next batch while the compute still reads it.
        """
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for tensor in tensors:
            if tensor.is_cuda:
                tensor.record_stream(current)
