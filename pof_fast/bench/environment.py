"""The machine, versions and command, written beside every number."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Dict, Optional

import torch

from .. import dispatch

__all__ = ["environment", "write_json"]


def _version(package: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
        if name:
            return name
    return platform.processor()


def environment(device: str) -> Dict[str, Any]:
    """Date, command, Python, platform, torch/Triton versions, CPU, threads, load, backends, the compiled
    extension's build and ABI target (and the GPU)."""
    report = dispatch.backends()
    env = dict(date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()), command=" ".join(sys.argv),
               python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
               triton=_version("triton"), cpu=_cpu_name(), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(),
               load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
               backends={k: (v if v is True else str(v)) for k, v in report.items()}, extension=report.extension)
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def write_json(path: Optional[str], device: str, **fields: Any) -> Dict[str, Any]:
    """``{"environment": environment(device), **fields}``, written to ``path`` when one is given, and returned."""
    result = {"environment": environment(device), **fields}
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
    return result
