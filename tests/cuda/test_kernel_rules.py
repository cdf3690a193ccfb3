"""Rules of the CUDA sources that a compiler does not check, read from the files.

Programmatic dependent launch lets a kernel start before its predecessor's
writes are visible: every kernel of a mode that launches with it must wait
(griddepcontrol.wait) before it reads anything. The low-latency mode makes
that structural (one __global__ entry that waits, then runs the kernel's
body); this test keeps it so.
"""

import pathlib
import re

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "ffi" / "kernels"
PDL = "cudaLaunchAttributeProgrammaticStreamSerialization"
GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\([^)]*\)\s*\{")


def _sources(folder):
    return [p for p in folder.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cc")]


def _modes_with_pdl():
    return sorted({p.parent for p in KERNELS.rglob("*") if p.is_file()
                   and PDL in p.read_text(errors="replace")})


def test_the_low_latency_mode_uses_dependent_launch():
    assert KERNELS / "low_latency" in _modes_with_pdl()


def test_every_kernel_of_a_pdl_mode_waits_first():
    for folder in _modes_with_pdl():
        for path in _sources(folder):
            text = path.read_text()
            for m in GLOBAL.finditer(text):
                first = text[m.end():].lstrip().split(";", 1)[0]
                assert first == "WaitPreviousKernel()", (
                    f"{path.name}: __global__ {m.group(1)} must call WaitPreviousKernel() "
                    f"before anything else (it may be launched with programmatic dependent "
                    f"launch); low-latency kernels are structs run by LLKernelEntry.")


def test_low_latency_kernels_start_only_through_the_waiting_entry():
    folder = KERNELS / "low_latency"
    globals_ = {m.group(1) for p in _sources(folder) for m in GLOBAL.finditer(p.read_text())}
    assert globals_ == {"LLKernelEntry"}, globals_
    for path in _sources(folder):
        text = path.read_text()
        assert "<<<" not in text or path.name == "device.cuh", path.name
        assert "cudaLaunchKernelEx" not in text or path.name == "device.cuh", path.name
