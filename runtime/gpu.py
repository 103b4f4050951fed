"""GPU discovery: CUDA_VISIBLE_DEVICES when set, else nvidia-smi."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional


def detect_gpu_ids() -> List[int]:
    """IDs of the GPUs this node may use ([] when none or nvidia-smi is absent)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        out = []
        for part in visible.split(","):
            part = part.strip()
            if part.isdigit():
                out.append(int(part))
        return out
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        proc = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    return [int(line.strip()) for line in proc.stdout.splitlines() if line.strip().isdigit()]


def resolve_gpu_ids(num_gpus: Optional[float]) -> List[int]:
    detected = detect_gpu_ids()
    if num_gpus is None:
        return detected
    n = int(num_gpus)
    return detected[:n] if len(detected) >= n else list(range(n))
