"""Portable numerics: the same seed gives the same bytes on any x86-64 processor with AVX2.

The same seed always gives the same numbers on one machine. Across processors it need not: PyTorch's
own kernels (ATen), MKL, oneDNN and NumPy's OpenBLAS each pick code paths by the instruction set they
find (AVX2, AVX-512, AMX), the paths sum in different orders, and training amplifies the last bits
(measured: ``configs/default.yaml`` and the COSMOS smoke config give other records on an AMD EPYC with
AVX-512 than on the AVX2 machine that recorded ``tests/golden``). Pinning all four libraries to their
AVX2 paths removes the difference: with these variables the AVX-512 machine gives the AVX2 machine's
records byte for byte. They are read when the libraries load, so they must be in the environment
before the process starts; ``hetpfl run --portable-numerics`` restarts itself with them set. The cost
is speed on processors with wider vectors (a few percent on the small models here).

Not every processor follows the pins: on an Intel Xeon with AMX and AVX512-FP16 (Sapphire Rapids,
measured 2026-12-05) ``configs/default.yaml`` still gives other records, from round 0 and only for
its ``mobilenet_small`` clients (depthwise convolutions: both oneDNN's and MKL's paths change the bytes
there under other settings of their variables, and no setting tried — ``MKL_CBWR=AVX2,STRICT`` or
``COMPATIBLE``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``, NumPy's ``NPY_DISABLE_CPU_FEATURES`` — gave the
recorded bytes). :func:`portable_numerics_reproduces_records` says so for such a processor; the same
seed still gives the same bytes on it, run after run.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import NoReturn, Sequence

PORTABLE_NUMERICS_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's vectorized kernels
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility, AVX2 branch
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN convolutions and matmuls
    "OPENBLAS_CORETYPE": "Haswell",  # NumPy/SciPy's OpenBLAS (k-means, clustering thresholds)
}


def portable_numerics_active(environ: dict[str, str] | None = None) -> bool:
    """Whether every variable of :data:`PORTABLE_NUMERICS_ENV` has its pinned value."""
    environ = os.environ if environ is None else environ
    return all(environ.get(key) == value for key, value in PORTABLE_NUMERICS_ENV.items())


def portable_numerics_supported() -> bool:
    """Whether this processor can run the pinned paths (Linux on x86-64 with AVX2)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def portable_numerics_reproduces_records() -> bool:
    """Whether the pins are known to reproduce the AVX2 machine's records here (not on processors
    with AMX tiles: see the module's docstring)."""
    try:
        return " amx_tile" not in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True


def restart_with_portable_numerics(argv: Sequence[str]) -> NoReturn:
    """Replace this process by ``python -m hetpfl.cli *argv`` with the pinned variables set."""
    env = {**os.environ, **PORTABLE_NUMERICS_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "hetpfl.cli", *argv], env)
