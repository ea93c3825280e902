"""The machine kiln runs on: the GPUs it knows (dense peak FLOP/s and memory, one table for a
run's MFU and `kiln plan`), and the CPU cores trainer.threads is checked against.

A run reports MFU (model FLOPs per second over the device's dense peak) on any device this
table names; `kiln plan --gpu NAME` sizes a run for one. Figures are the vendors' data sheets,
without sparsity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kiln.errors import KilnError


@dataclass(frozen=True)
class GPU:
    name: str
    """As `kiln plan --gpu` takes it."""
    match: str
    """A fragment of torch.cuda.get_device_name() that identifies it."""
    bf16: float
    """Dense peak FLOP/s in bf16."""
    fp32: float
    """Dense peak FLOP/s in fp32 (TF32 off)."""
    memory: float
    """Memory in the vendor's GB (1e9 bytes). What torch sees is a little more (an H100 80GB
    reports 79.6 GiB = 85.5e9 bytes), which leaves room besides the CUDA context; B200: the
    180 GB it exposes of its 192 GB."""


GPUS = (
    GPU("h100", "H100", 989e12, 67e12, 80e9),
    GPU("h200", "H200", 989e12, 67e12, 141e9),
    GPU("b200", "B200", 2.25e15, 80e12, 180e9),
    GPU("a100", "A100", 312e12, 19.5e12, 80e9),
    GPU("a100-40gb", "A100", 312e12, 19.5e12, 40e9),
    GPU("l40s", "L40S", 362e12, 91.6e12, 48e9),
    GPU("a10g", "A10G", 125e12, 31.2e12, 24e9),
)


def by_name(name: str) -> GPU:
    """The GPU `kiln plan --gpu NAME` means; one line with a suggestion when unknown."""
    for gpu in GPUS:
        if gpu.name == name.lower():
            return gpu
    import difflib

    names = [g.name for g in GPUS]
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.4)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KilnError(f"unknown --gpu {name!r}{hint}; known: {', '.join(names)}")


def of_device_name(device_name: str) -> GPU | None:
    """The table's entry for a device as torch names it ("NVIDIA H100 80GB HBM3"), if any."""
    return next((g for g in GPUS if g.match in device_name), None)


def peak_flops(device: torch.device, precision: str, device_name: str | None = None
               ) -> float | None:
    """Dense peak FLOP/s of `device` in `precision` ("bf16" or "fp32"); None for a device the
    table does not name (a CPU, say), for which no MFU is reported. `device_name` overrides
    what torch says the device is."""
    if device_name is None:
        if device.type != "cuda":
            return None
        device_name = torch.cuda.get_device_name(device)
    gpu = of_device_name(device_name)
    if gpu is None:
        return None
    return gpu.bf16 if precision == "bf16" else gpu.fp32


def threads_warning(threads: int | None) -> str | None:
    """A warning when trainer.threads asks for more threads than this machine has cores."""
    cores = os.cpu_count() or 1
    if threads is None or threads <= cores:
        return None
    return (f"trainer.threads={threads} is more than the {cores} cores of this machine: the "
            "threads would take turns on them, which is slower than one per core")
