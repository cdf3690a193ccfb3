"""Where the GPU tests run: is there a GPU, and the folder of their worker modules.

The GPU check asks nvidia-smi instead of starting JAX's GPU backend: the pytest
process must hold no CUDA context of its own while MPS clients run.
"""

import os
import shutil
import subprocess

WORKERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")


def gpu_present() -> bool:
    if not shutil.which("nvidia-smi") or not shutil.which("nvidia-cuda-mps-control"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
