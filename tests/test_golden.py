"""Shipped configs give the records they gave before the next-wave refactor, byte for byte.

``tests/golden/*.metrics.jsonl`` were written by the code at commit 15e577e (before module slots,
typed client states, the group executor, the ``learn`` package and the data registry) with
``hetpfl run <config>`` (CPU torch 2.13.0, one torch thread). The low bits of CPU kernels differ
between processors (oneDNN/MKL pick kernels by vendor and instruction set: MobileNet's depthwise
convolutions and COSMOS's clustering threshold came out different on an AMD EPYC with AVX-512), and
training amplifies them, so each config has one record per machine kind it was recorded on:
``<name>.metrics.jsonl`` (the first project machine) and ``<name>.<machine>.metrics.jsonl``; a run must
equal one of them byte for byte. A change that alters a number here changes what users' shipped
configs compute: it must be deliberate, and the golden files regenerated in the same commit. On a
new kind of machine, record its variant with the code of 15e577e (``git worktree add /tmp/old
15e577e; PYTHONPATH=/tmp/old/src hetpfl run <config> -o out``) and check it equals today's run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hetpfl.experiment import load_config, run_experiment

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.slow
@pytest.mark.parametrize("config, golden", [
    ("configs/default.yaml", "default.metrics.jsonl"),
    ("configs/cosmos/smoke.yaml", "cosmos-smoke.metrics.jsonl"),
])
def test_shipped_config_gives_its_golden_records(config, golden, tmp_path):
    run_experiment(load_config(REPO / config), tmp_path)
    stem = golden.removesuffix(".metrics.jsonl")
    recorded = sorted(GOLDEN.glob(f"{stem}.*metrics.jsonl"))
    assert len(recorded) >= 2, recorded  # the first machine's record and at least one other
    records = {path.name: path.read_text() for path in recorded}
    assert (tmp_path / "metrics.jsonl").read_text() in records.values(), (
        f"{config}: no recorded golden ({', '.join(records)}) matches; if this is a new kind of machine, "
        "record its variant as this module's docstring says")
