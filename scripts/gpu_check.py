"""GPU check on a machine with a real NVIDIA GPU (not part of CI, which has none).

Starts a private cluster with GPU detection (nvidia-smi), runs a num_gpus=1 task
that makes a real CUDA call through PyTorch, and prints what it saw. Exit status
0 only if detection, CUDA_VISIBLE_DEVICES, get_gpu_ids() and the CUDA call agree.
"""
import json
import os
import sys

import runtime as ray


@ray.remote(num_gpus=1)
def on_gpu():
    import torch

    x = torch.arange(1_000_000, device="cuda", dtype=torch.float64)
    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_ids": ray.get_gpu_ids(), "cuda_available": torch.cuda.is_available(),
            "device_count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0),
            "sum": float(x.sum())}


@ray.remote(num_gpus=0)
def no_gpu():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def main() -> int:
    ray.init(num_cpus=2)
    total = ray.cluster_resources().get("GPU", 0)
    out = ray.get(on_gpu.remote())
    plain = ray.get(no_gpu.remote())
    ray.shutdown()
    report = {"cluster_gpus": total, "gpu_task": out, "cpu_task_CUDA_VISIBLE_DEVICES": plain}
    print(json.dumps(report, indent=2))
    ok = (total >= 1 and out["cuda_available"] and out["gpu_ids"]
          and out["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, out["gpu_ids"]))
          and out["sum"] == 499999500000.0)
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
