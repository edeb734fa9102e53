"""The C++ fake-quant kernels for the CPU (`csrc/fake_quant_cpu.cpp`), built on first use.

The build (about 30 s, then cached in torch's extension directory) is named after the instruction set it
targets, chosen from torch's own CPU detection, so a cached build never runs on a CPU that lacks its
instructions, and after the Python and torch versions, so environments that differ in them keep their own
builds. If it fails (no compiler, say), one warning is issued and `extension()` returns None: callers keep the
pure-torch path, which computes the same values. ``QAT_CPU_KERNELS=0`` turns the kernels off.

Outputs of 1 MiB and more come from the extension's own block cache: a freed output's memory is kept (at
most 1 GiB) for the next output of its size, since fresh pages from the OS cost more to touch than a pass
over them. `release_cached_blocks()` gives it back (after training, say).

Which tensors the kernels serve, and how their results map onto the torch path, is `qat.quant.affine`'s
business (`cpu_kernels_apply`); this module only builds and loads them.
"""
from __future__ import annotations

import functools
import os
import sys
import time
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
# A build takes about 30 s: a lock file older than this was left by an interrupted one
STALE_LOCK_SECONDS = 600


def enabled() -> bool:
    """False when the environment turns the kernels off (``QAT_CPU_KERNELS=0``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def extension() -> ModuleType | None:
    """The loaded kernels, or None (turned off, or the build failed: warned once)."""
    return _build() if enabled() else None


@functools.cache
def _build() -> ModuleType | None:
    suffix, isa_flags = ISA_BUILDS.get(torch.backends.cpu.get_cpu_capability(), GENERIC_BUILD)
    torch_version = torch.__version__.split("+")[0].replace(".", "_")
    name = f"qat_fake_quant_cpu_{suffix}_torch{torch_version}"
    try:
        from torch.utils import cpp_extension

        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
        build_directory = root / f"py{sys.version_info.major}{sys.version_info.minor}" / name
        build_directory.mkdir(parents=True, exist_ok=True)
        clear_stale_build_lock(build_directory)
        return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=[*COMMON_FLAGS, *isa_flags],
                                  build_directory=str(build_directory))
    except Exception as error:  # a missing compiler or ninja, a failed build: all mean the torch path
        warnings.warn(f"qat's CPU fake-quant kernels could not be built ({type(error).__name__}: {error}); "
                      f"using the pure-torch path (same values, slower). Set {ENV_SWITCH}=0 to skip the build.",
                      RuntimeWarning, stacklevel=2)
        return None


def clear_stale_build_lock(build_directory: Path) -> bool:
    """Remove the build lock an interrupted build left in `build_directory`, if torch would wait on it forever;
    True if removed (with a warning).

    torch versions whose extension builds lock by the mere existence of a file (`FileBaton`; later versions
    hold an OS lock, released when its holder dies) wait without end on the file a killed build leaves behind.
    There a lock file older than STALE_LOCK_SECONDS is removed; a younger one may belong to a build running now.
    """
    from torch.utils import cpp_extension

    lock = build_directory / "lock"
    if not hasattr(cpp_extension, "FileBaton") or not lock.exists():
        return False
    age = time.time() - lock.stat().st_mtime
    if age < STALE_LOCK_SECONDS:
        return False
    warnings.warn(f"removing {lock}, left {age / 60:.0f} minutes ago by an interrupted build of qat's CPU "
                  "kernels (this torch version would wait on it forever)", RuntimeWarning, stacklevel=2)
    lock.unlink(missing_ok=True)
    return True


def release_cached_blocks() -> int:
    """Free the memory the kernels keep for their next outputs; the bytes freed (0 if they were never loaded).

    >>> release_cached_blocks() >= 0
    True
    """
    if _build.cache_info().currsize == 0 or _build() is None:
        return 0
    return _build().release_cached_blocks()
