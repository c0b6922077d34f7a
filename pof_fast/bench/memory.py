"""Peak extra memory of one call.

On CUDA: the rise of ``torch.cuda.max_memory_allocated`` during the call. On the CPU: the peak of the
running sum of every allocation and free that PyTorch's CPU allocator reports to ``torch.profiler``
during the call (outputs still alive at the end count; memory a C++ kernel takes outside PyTorch's
allocator, e.g. a ``std::vector``, is not seen).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import torch

__all__ = ["peak_extra_bytes"]


def peak_extra_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak memory allocated during one call of ``fn`` above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    current = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        current += event["args"]["Bytes"]
        peak = max(peak, current)
    return peak
