"""The C++ fake-quant kernels for the CPU (`csrc/fake_quant_cpu.cpp`), built on first use.

The build (about 30 s, then cached in torch's extension directory) is named after the instruction set it
targets, chosen from torch's own CPU detection, so a cached build never runs on a CPU that lacks its
instructions. If it fails (no compiler, say), one warning is issued and `extension()` returns None: callers
keep the pure-torch path, which computes the same values. ``QAT_CPU_KERNELS=0`` turns the kernels off.

Outputs of 1 MiB and more come from the extension's own block cache: a freed output's memory is kept (at
most 1 GiB) for the next output of its size, since fresh pages from the OS cost more to touch than a pass
over them. `release_cached_blocks()` gives it back (after training, say).

Which tensors the kernels serve, and how their results map onto the torch path, is `qat.quant.affine`'s
business (`cpu_kernels_apply`); this module only builds and loads them.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "fake_quant_cpu.cpp"
ENV_SWITCH = "QAT_CPU_KERNELS"
# -ffp-contract=off: no fused multiply-adds, so every product is rounded as in torch's own passes
COMMON_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
# torch's CPU capability -> (build name suffix, instruction-set flags)
ISA_BUILDS = {
    "AVX512": ("avx512", ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")),
    "AVX2": ("avx2", ("-mavx2", "-mfma")),
}
GENERIC_BUILD = ("generic", ())


def enabled() -> bool:
    """False when the environment turns the kernels off (``QAT_CPU_KERNELS=0``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def extension() -> ModuleType | None:
    """The loaded kernels, or None (turned off, or the build failed: warned once)."""
    return _build() if enabled() else None


@functools.cache
def _build() -> ModuleType | None:
    suffix, isa_flags = ISA_BUILDS.get(torch.backends.cpu.get_cpu_capability(), GENERIC_BUILD)
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"qat_fake_quant_cpu_{suffix}", sources=[str(SOURCE)],
                    extra_cflags=[*COMMON_FLAGS, *isa_flags])
    except Exception as error:  # a missing compiler or ninja, a failed build: all mean the torch path
        warnings.warn(f"qat's CPU fake-quant kernels could not be built ({type(error).__name__}: {error}); "
                      f"using the pure-torch path (same values, slower). Set {ENV_SWITCH}=0 to skip the build.",
                      RuntimeWarning, stacklevel=2)
        return None


def release_cached_blocks() -> int:
    """Free the memory the kernels keep for their next outputs; the bytes freed (0 if they were never loaded).

    >>> release_cached_blocks() >= 0
    True
    """
    if _build.cache_info().currsize == 0 or _build() is None:
        return 0
    return _build().release_cached_blocks()
