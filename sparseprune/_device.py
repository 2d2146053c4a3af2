"""Human-readable names of the device a result was measured on (for CSV rows and cache keys)."""

from __future__ import annotations

import platform

import torch


def cpuinfo_blocks(path: str = "/proc/cpuinfo") -> list[dict[str, str]]:
    """/proc/cpuinfo as one {field: value} dict per logical CPU ([] where there is no such file)."""
    blocks: list[dict[str, str]] = []
    try:
        with open(path) as f:
            cur: dict[str, str] = {}
            for line in f:
                if not line.strip():
                    if cur:
                        blocks.append(cur)
                    cur = {}
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    cur[key.strip()] = value.strip()
            if cur:
                blocks.append(cur)
    except OSError:
        pass
    return blocks


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    blocks = cpuinfo_blocks()
    if blocks and blocks[0].get("model name"):
        return blocks[0]["model name"]
    return platform.processor() or platform.machine() or "cpu"


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
