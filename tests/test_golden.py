"""Shipped configs give the records they gave before the next-wave refactor, byte for byte.

``tests/golden/*.metrics.jsonl`` were written by the code at commit 15e577e (before module slots,
typed client states, the group executor, the ``learn`` package and the data registry) with
``hetpfl run <config>``, on this project's machines (CPU torch 2.13.0, one torch thread). A change
that alters a number here changes what users' shipped configs compute: it must be deliberate, and
the golden files regenerated with the command above in the same commit.
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
    assert (tmp_path / "metrics.jsonl").read_text() == (GOLDEN / golden).read_text()
