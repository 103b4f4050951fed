"""GPU discovery: CUDA_VISIBLE_DEVICES when set, else nvidia-smi; and the GPUs' model as
Ray names it (``A100``, ``H200``: the node's accelerator type)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional

# Ray's pattern (python/ray/_private/accelerators/nvidia_gpu.py): the model after the
# brand, up to a hyphen ("NVIDIA A100-SXM4-40GB" -> "A100", "Tesla V100-SXM2-16GB" ->
# "V100", "NVIDIA RTX PRO 6000 Blackwell" -> "RTX PRO 6000"). Mixed-case consumer names
# ("NVIDIA GeForce RTX 4090") give no type.
_NVIDIA_NAME = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")


def _nvidia_smi(query: str) -> List[List[str]]:
    """Rows of an nvidia-smi --query-gpu, [] when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        proc = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    return [[field.strip() for field in line.split(",")]
            for line in proc.stdout.splitlines() if line.strip()]


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
    return [int(row[0]) for row in _nvidia_smi("index") if row and row[0].isdigit()]


def resolve_gpu_ids(num_gpus: Optional[float]) -> List[int]:
    detected = detect_gpu_ids()
    if num_gpus is None:
        return detected
    n = int(num_gpus)
    return detected[:n] if len(detected) >= n else list(range(n))


def accelerator_type_of(gpu_name: str) -> Optional[str]:
    """The accelerator type of a GPU model name, as Ray derives it; None if it has none."""
    match = _NVIDIA_NAME.match(gpu_name or "")
    return match.group(1) if match else None


def detect_accelerator_type(gpu_ids: List[int]) -> Optional[str]:
    """The type of the node's first GPU (Ray gives a node one type), None when the node
    has no GPU or its model is unknown. Only asks nvidia-smi when there are GPUs."""
    if not gpu_ids:
        return None
    names: Dict[int, str] = {int(row[0]): row[1] for row in _nvidia_smi("index,name")
                             if len(row) >= 2 and row[0].isdigit()}
    name = names.get(gpu_ids[0]) or next(iter(names.values()), None)
    return accelerator_type_of(name) if name else None
