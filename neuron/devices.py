"""What compute this host has: CUDA devices (via torch, imported lazily) and the CPU fallback,
with memory figures for placement decisions and heartbeats."""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path

from bus_schema.messages import Device, HostInfo

log = logging.getLogger(__name__)
_MB = 1024 * 1024


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``f16c``, ``avx512_bf16``...) from ``/proc/cpuinfo``;
    empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def _meminfo() -> tuple[int, int]:
    """(total, available) system memory in MiB; zeros where /proc/meminfo is unavailable."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0, 0
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) // 1024  # kB -> MiB
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def host_info() -> HostInfo:
    total, available = _meminfo()
    return HostInfo(
        hostname=socket.gethostname(),
        cpu_count=os.cpu_count() or 0,
        memory_total_mb=total,
        memory_available_mb=available,
    )


def discover_devices() -> tuple[Device, ...]:
    """CUDA devices with their free memory, then the CPU (system memory) as the last device."""
    devices: list[Device] = []
    try:
        import torch  # lazy: optional and heavy; the neuron extra provides it

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                devices.append(
                    Device(
                        index=index,
                        kind="cuda",
                        name=torch.cuda.get_device_name(index),
                        memory_total_mb=total // _MB,
                        memory_free_mb=free // _MB,
                    )
                )
    except ImportError:
        log.debug("torch not installed: CPU only")
    total, available = _meminfo()
    devices.append(
        Device(
            index=len(devices),
            kind="cpu",
            name="cpu",
            memory_total_mb=total,
            memory_free_mb=available,
        )
    )
    return tuple(devices)


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda:0`` when a CUDA device exists, else ``cpu``."""
    if requested != "auto":
        return requested
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda:0"
    except ImportError:
        pass
    return "cpu"


def accelerator_free_mb(device: str) -> int:
    """Free memory of the accelerator ``cuda:N`` in MiB; 0 for the CPU or when unknown."""
    if not device.startswith("cuda"):
        return 0
    try:
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
    except (ImportError, RuntimeError, ValueError):
        return 0
    return int(free // _MB)
