"""What every fused op shares: the choice of implementation, the row layout, padded buffers and argument checks.

Each op (kd_mlm, linear_kd_mlm, cosine) works on rows: its inputs are flattened to (N, width) with a unit stride
along the width, and its row primitive has a Triton kernel and a pure-torch twin of the same algorithm. `impl`
picks one: "triton" (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was imported),
"torch" (chunked torch, the CPU path), "auto" (triton on CUDA, torch otherwise).
"""

from __future__ import annotations

import os

import torch

IGNORE_INDEX = -100
IMPLS = ("auto", "torch", "triton")
# The names configs, command lines and tables use for the float dtypes the ops take (the one map of the project).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = tuple(DTYPES.values())
# Row strides of the (rows, V) work buffers are padded to this many elements (256 bytes in fp32): V = 30,522 is
# 2 mod 8, and unpadded rows would deny both the row kernels and cuBLAS their aligned wide loads.
ROW_ALIGN = 64


def use_triton(impl: str, device: torch.device) -> bool:
    """Whether `impl` on `device` means the Triton kernels (True) or the torch twins (False)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return device.type == "cuda"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported for CPU tensors"
        )
    return impl == "triton"


def flat(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) -> (rows, width) with a unit stride along width (what the row primitives need)."""
    x = x.reshape(-1, width)
    return x if x.stride(-1) == 1 else x.contiguous()


def padded_width(width: int) -> int:
    """`width` rounded up to a multiple of ROW_ALIGN: the row stride of the work buffers."""
    return -(-width // ROW_ALIGN) * ROW_ALIGN


def padded_rows(rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (rows, width) view of a buffer whose row stride is padded_width(width)."""
    return torch.empty((rows, padded_width(width)), dtype=dtype, device=device)[:, :width]


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def check_rows(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Exact shape, and stride 1 along the last dimension (rows may have any stride)."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.dim() == 2 and tensor.size(1) > 1 and tensor.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension, got strides {tensor.stride()}")


def check_vector(name: str, tensor: torch.Tensor, length: int, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(tensor.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
    check_device(name, tensor, device)
