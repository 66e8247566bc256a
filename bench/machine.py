"""What the numbers were taken on: CPUs, memory, disk, load, and the tools' versions."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from bench.checks import BenchError
from bench.datasets import GiB


def _first_field(path: str, prefix: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return None


def machine_info(folder: Path) -> dict:
    mem = None
    with contextlib.suppress(ValueError, IndexError, AttributeError):
        mem = round(int((_first_field("/proc/meminfo", "MemTotal:") or "").split()[0]) / 1024**2, 1)
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _first_field("/proc/cpuinfo", "model name") or "unknown",
        "memory_gib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk": disk_info(folder),
        "loadavg_at_start": os.getloadavg(),
    }


def _mount_of(folder: Path) -> tuple[str, str, str]:
    """(mount point, device, file system) of the deepest mount holding folder."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            device, mountpoint, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
            inside = str(folder) == mountpoint or str(folder).startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best[0]):
                best = (mountpoint, device, fstype)
    return best


def disk_info(folder: Path) -> dict:
    """The mount holding `folder`: device, file system, rotational flag, free space."""
    mountpoint, device, fstype = _mount_of(folder)
    rotational = None
    dev_name = Path(device).name
    for candidate in (dev_name, dev_name.rstrip("0123456789").removesuffix("p")):
        flag = Path(f"/sys/class/block/{candidate}/queue/rotational")
        if flag.exists():
            rotational = flag.read_text().strip() == "1"
            break
    usage = shutil.disk_usage(folder)
    return {"folder": str(folder), "mountpoint": mountpoint, "device": device, "fstype": fstype,
            "rotational": rotational, "free_gib": round(usage.free / GiB, 1)}


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def find_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise BenchError(f"{name} not found on PATH or next to {sys.executable}")
    return found
