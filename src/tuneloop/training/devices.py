"""Where a training run computes and in which precision: `train.device` and `train.precision` resolved against
what this machine has, once, before anything is built.

A CUDA GPU when torch sees one (under torchrun each process takes the GPU of its local rank, and the processes
talk over NCCL for GPU tensors and gloo for the small CPU objects they exchange); else the CPU. On a GPU the
forward pass runs under bf16 autocast where the GPU has bf16, else fp16 with a gradient scaler (Accelerate's); on
a CPU under bf16 only where the CPU runs it natively, since emulated bf16 is slower than fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneloop.config import DeviceSettings
from tuneloop.errors import TuneloopError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DevicePlan:
    """The device a run trains on and the autocast precision of its forward passes."""

    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16"

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.precision)

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.precision == "fp16"

    def autocast(self) -> torch.autocast:
        """The forward pass's autocast context (a no-op in fp32)."""
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the training device: through pinned memory and without waiting, on a GPU."""
        if not self.on_gpu:
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def describe(self) -> str:
        return f"{self.device} in {self.precision}"


def cpu_supports_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16 or AMX); elsewhere autocast only slows down."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def plan_device(settings: DeviceSettings, private: bool = False, section: str = "train") -> DevicePlan:
    """`train.device` and `train.precision` (or pretrain's) as this machine can run them; one clear error where it
    cannot."""
    cuda = torch.cuda.is_available()
    if settings.device == "cuda" and not cuda:
        raise TuneloopError(
            f"{section}.device=cuda, and torch sees no CUDA GPU (a CPU-only torch build, or no driver): install a "
            f"CUDA build of torch on a machine with a GPU, or use {section}.device=auto"
        )
    on_gpu = cuda and settings.device != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    return DevicePlan(device, _precision(settings.precision, on_gpu, private, section))


def _precision(setting: str, on_gpu: bool, private: bool, section: str) -> str:
    if private:
        if setting in ("bf16", "fp16"):
            raise TuneloopError(
                f"train.precision={setting} with train.dp: DP-SGD clips each text's gradient in fp32; "
                "use train.precision=auto or fp32"
            )
        return "fp32"
    if setting == "fp16" and not on_gpu:
        raise TuneloopError(f"{section}.precision=fp16 needs a CUDA GPU (CPUs have no fp16 autocast); use auto or bf16")
    if setting != "auto":
        return setting
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def process_group_backend(plan: DevicePlan) -> str:
    """gloo for CPU tensors (the objects ranks exchange, and all of a CPU run); NCCL for a GPU run's tensors."""
    return "cpu:gloo,cuda:nccl" if plan.on_gpu else "gloo"
