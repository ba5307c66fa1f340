import os
from pathlib import Path

import pytest
import torch

# Two runs of one experiment must match bit for bit; fixing the thread count keeps CPU kernels
# from choosing different reduction orders between processes.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HETPFL_DATA_DIR", str((REPO / ".." / "shared" / "data").resolve()))


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    """Decoded datasets and the tests' tiny pretrained backbones go to one cache per test session
    (never the user's cache)."""
    if "HETPFL_CACHE_DIR" not in os.environ:
        os.environ["HETPFL_CACHE_DIR"] = str(tmp_path_factory.mktemp("hetpfl-cache"))
    if "HETPFL_BACKBONE_DIR" not in os.environ:
        os.environ["HETPFL_BACKBONE_DIR"] = str(tmp_path_factory.mktemp("hetpfl-backbones"))
    yield


def benchmark_script(name: str):
    """The module ``benchmarks/<name>.py`` (a script, not a package), loaded for a test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_written_as_shipped(written_root: Path, shipped: Path) -> list[Path]:
    """A config-writing script wrote exactly the committed ``shipped`` folder (nobody edited it by
    hand); returns the configs' paths relative to it."""
    written = sorted(p.relative_to(written_root) for p in written_root.rglob("*.yaml"))
    assert written == sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml"))
    assert all((written_root / p).read_text() == (shipped / p).read_text() for p in written)
    return written


def small_config(algorithm: str = "fedmd", **overrides):
    """A seconds-long experiment on digits with three architecture families."""
    from hetpfl.experiment import load_config

    base = {
        "name": f"test-{algorithm}",
        "seed": 0,
        "rounds": 2,
        "algorithm": {"name": algorithm},
        "data": {"dataset": "digits", "num_clients": 6, "partition": "dirichlet", "dirichlet_alpha": 0.5,
                 "public_fraction": 0.2},
        "models": {"clients": ["mlp", "cnn_small", "mobilenet_small"]},
        "client": {"local_epochs": 2, "batch_size": 32, "lr": 0.003},
    }
    return load_config(base=base, overrides=[f"{k}={v}" for k, v in overrides.items()])


def recording_transport(host):
    """The simulator's transport, keeping every exchange: ``sent[stage][rnd]`` and
    ``replies[stage][rnd]`` ({client: Message}) — what went down and what reached the server."""
    from hetpfl.simulator import InProcessTransport

    class RecordingTransport(InProcessTransport):
        def __init__(self):
            super().__init__(host)
            self.sent, self.replies = {}, {}

        def exchange(self, stage, rnd, messages):
            self.sent.setdefault(stage, {})[rnd] = dict(messages)
            result = super().exchange(stage, rnd, messages)
            self.replies.setdefault(stage, {})[rnd] = dict(result.replies)
            return result

    return RecordingTransport()
