"""Where a merge's math runs: the CPU with the numba kernels (the default), or torch devices (`--device cuda`,
`--multi-gpu`) with the torch kernels, whose elementwise results are the same bytes as the CPU's.

A placement is resolved and checked before anything is read: asking for CUDA on a machine without it is a
one-line error. On a device path every tensor is merged whole on its device (no row blocks: GPU memory holds a
tensor's inputs), output tensors go round-robin over the devices, and each device has its own memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergelib.errors import MergelibError

KERNELS = ("numba", "torch")
DEVICE_SHARE = 0.8  # of a GPU's free memory a merge may hold at once (the rest: CUDA context, allocator slack)


class DeviceError(MergelibError):
    """The requested device does not exist here or the flags contradict each other."""


@dataclass(frozen=True)
class Placement:
    """Devices a merge computes on, whether the torch kernels run (always off the CPU; then every tensor is merged
    whole), and whether inputs are moved to the device before their conversion to float32 (`read_to_device`:
    mergekit's --read-to-gpu)."""

    devices: tuple[str, ...] = ("cpu",)
    torch_kernels: bool = False
    read_to_device: bool = False

    def device_for(self, index: int) -> str:
        """The device of the index-th output tensor (round-robin in plan order)."""
        return self.devices[index % len(self.devices)]

    def budget_for(self, device: str, host_budget: int) -> int:
        """Bytes a device may hold for merges at once: a share of a GPU's free memory, `host_budget` on the CPU."""
        if device == "cpu":
            return host_budget
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * DEVICE_SHARE)


CPU = Placement()


def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_placement(device: str = "cpu", *, multi_gpu: bool = False, read_to_gpu: bool = False,
                      kernels: str | None = None) -> Placement:
    """Check the device flags against this machine and give the placement (DeviceError: one line, exit 2)."""
    device = str(device or "cpu").strip().lower()
    if kernels is not None and kernels not in KERNELS:
        raise DeviceError(f"kernels '{kernels}': choose {' or '.join(KERNELS)}")
    kind, _, number = device.partition(":")
    if kind not in ("cpu", "cuda") or (number and (kind == "cpu" or not number.isdigit())):
        raise DeviceError(f"--device '{device}': choose cpu, cuda or cuda:N (N: a GPU's number)")
    count = _cuda_devices()
    if kind == "cuda" or multi_gpu:
        if count == 0:
            flag = "--multi-gpu" if multi_gpu else f"--device {device}"
            raise DeviceError(f"{flag}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                              "merge with --device cpu or run on a machine with a GPU and a CUDA build of torch")
        if number and int(number) >= count:
            raise DeviceError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        if kernels == "numba":
            raise DeviceError("kernels 'numba' run on the CPU only; a CUDA merge uses the torch kernels")
        devices = tuple(f"cuda:{i}" for i in range(count)) if multi_gpu else (f"cuda:{int(number or 0)}",)
        return Placement(devices=devices, torch_kernels=True, read_to_device=read_to_gpu)
    if read_to_gpu:
        raise DeviceError("--read-to-gpu reads inputs onto the GPU: give --device cuda (or --cuda) with it")
    return Placement(torch_kernels=kernels == "torch")


__all__ = ["CPU", "DeviceError", "KERNELS", "Placement", "resolve_placement"]
