"""Shipped configs give the records they gave before the next-wave refactor, byte for byte, on any machine.

``tests/golden/*.metrics.jsonl`` were written by the code at commit 15e577e (before module slots,
typed client states, the group executor, the ``learn`` package and the data registry) with
``hetpfl run <config>`` (CPU torch 2.13.0, one torch thread) on the first project machine, whose
processor has AVX2 and no AVX-512. The low bits of CPU kernels differ between processors and
training amplifies them, so the runs here use ``--portable-numerics`` (``hetpfl.numerics``): PyTorch,
MKL, oneDNN and OpenBLAS pinned to their AVX2 paths, which reproduces those records on an AMD EPYC
with AVX-512 too (without the pin it gives other bytes), but not on an Intel Xeon with AMX (Sapphire
Rapids: ``hetpfl.numerics``), where the test is skipped. A change that alters a number here changes
what users' shipped configs compute: it must be deliberate, and the golden files regenerated in the
same commit (``hetpfl run <config> --portable-numerics -o out``).

``runtime.kernels=reference`` (the former kernels) must still give those records; the default
``fast`` kernels (fused optimizer updates, channels-last conv classifiers: ``hetpfl.kernels``) sum in
other orders, and their records, ``*.fast.metrics.jsonl``, were written at the commit that made them
the default, the same way (``--set runtime.kernels=fast``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hetpfl.numerics import portable_numerics_reproduces_records, portable_numerics_supported

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.slow
@pytest.mark.skipif(not portable_numerics_supported(), reason="the records need x86-64 with AVX2")
@pytest.mark.skipif(not portable_numerics_reproduces_records(),
                    reason="the pins do not reproduce the records on this processor (AMX: hetpfl.numerics)")
@pytest.mark.parametrize("config, golden, kernels", [
    ("configs/default.yaml", "default.metrics.jsonl", "reference"),
    ("configs/cosmos/smoke.yaml", "cosmos-smoke.metrics.jsonl", "reference"),
    ("configs/default.yaml", "default.fast.metrics.jsonl", "fast"),
    ("configs/cosmos/smoke.yaml", "cosmos-smoke.fast.metrics.jsonl", "fast"),
])
def test_shipped_config_gives_its_golden_records(config, golden, kernels, tmp_path):
    run = subprocess.run([sys.executable, "-m", "hetpfl.cli", "run", config, "-o", str(tmp_path), "--portable-numerics",
                          "--set", f"runtime.kernels={kernels}"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["environment"]["portable_numerics"] is True
    assert (tmp_path / "metrics.jsonl").read_text() == (GOLDEN / golden).read_text(), (
        f"{config} computes other numbers than before; if deliberate, regenerate {GOLDEN / golden}")
