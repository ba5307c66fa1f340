"""Saveable state: trees of arrays, tensors, registry modules and plain values survive a round trip
through a record and an ``.npz`` file exactly, and what cannot be saved fails naming where."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hetpfl.experiment import prepare
from hetpfl.messages import Message
from hetpfl.models import build_model, build_module
from hetpfl.state import (
    ClientState,
    StateError,
    load_record,
    load_tree,
    record_to_tree,
    save_record,
    save_tree,
    tree_to_record,
)


def _build(spec):
    return build_module(spec, (1, 8, 8), 10)


def test_tree_round_trips_exactly_through_a_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn_small", (1, 8, 8), 10)
    tree = {
        "assignment": np.array([0, -1, 2], dtype=np.int64),
        "models": {3: model, 7: build_model("mlp", (1, 8, 8), 10)},  # int keys stay ints
        "measures": {"epsilon": 0.30000000000000004, "silhouette": float("nan")},
        "pair": (1, "a"),
        "history": [1.5, None, True, "x"],
        "tensor": torch.arange(4, dtype=torch.float32),
        "count": np.int64(5),
    }
    save_tree(tmp_path / "s.npz", tree)
    back = load_tree(tmp_path / "s.npz", build=_build)
    np.testing.assert_array_equal(back["assignment"], tree["assignment"])
    assert back["assignment"].dtype == np.int64
    assert list(back["models"]) == [3, 7]
    for key in (3, 7):
        a, b = tree["models"][key].state_dict(), back["models"][key].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back["models"][3].built_from == model.built_from
    assert back["measures"]["epsilon"] == 0.30000000000000004 and np.isnan(back["measures"]["silhouette"])
    assert back["pair"] == (1, "a") and back["history"] == [1.5, None, True, "x"]
    assert torch.equal(back["tensor"], tree["tensor"]) and back["count"] == 5 and type(back["count"]) is int


def test_records_on_disk_keep_dtypes_and_scalar_types(tmp_path):
    record = Message({"w": np.ones((2, 3), np.float32), "i": np.arange(3, dtype=np.int8)},
                     {"flag": True, "n": 3, "lr": 0.1, "name": "x"})
    save_record(tmp_path / "r.npz", record)
    back = load_record(tmp_path / "r.npz")
    assert {k: (v.dtype, v.shape) for k, v in back.arrays.items()} == {k: (v.dtype, v.shape) for k, v in record.arrays.items()}
    assert back.scalars == record.scalars and [type(v) for v in back.scalars.values()] == [bool, int, float, str]
    assert not list(tmp_path.glob(".*tmp")), "an atomic write leaves no temporary file"


def test_what_cannot_be_saved_fails_naming_the_path():
    with pytest.raises(StateError, match=r"state\['rng'\].*Generator cannot be saved"):
        tree_to_record({"rng": np.random.default_rng(0)})
    with pytest.raises(StateError, match=r"state\['net'\].*not built by the model registry"):
        tree_to_record({"net": nn.Linear(2, 2)})
    with pytest.raises(StateError, match="no module builder"):
        record_to_tree(tree_to_record({"m": build_model("mlp", (4,), 2)}))
    with pytest.raises(StateError, match="not a readable state record"):
        load_record(__file__)


def test_client_state_holds_only_arrays_and_scalars():
    state = ClientState()
    state["pretrained"] = True
    state["prototypes"] = np.zeros((2, 3), np.float32)
    state["count"] = np.int64(4)  # NumPy scalars become Python scalars
    assert state.get("pretrained") is True and state["count"] == 4 and type(state["count"]) is int
    assert sorted(state) == ["count", "pretrained", "prototypes"] and len(state) == 3
    with pytest.raises(StateError, match="'model'.*Linear cannot be kept"):
        state["model"] = nn.Linear(2, 2)
    with pytest.raises(StateError, match="'history'.*list"):
        state["history"] = [1, 2]
    message = state.to_message()
    assert set(message.arrays) == {"prototypes"} and message.scalars == {"pretrained": True, "count": 4}
    assert dict(ClientState.from_message(message)) == dict(state)


def test_every_server_saves_and_restores_through_the_default(tmp_path):
    """After a round, each registered method's server state survives save + load into a fresh
    server (each method's contract config, tests/configs/alg/)."""
    from test_contract import METHODS, method_config

    from hetpfl.clienthost import ClientHost
    from hetpfl.engine import Ledger, RoundComm
    from hetpfl.simulator import InProcessTransport

    for name in METHODS:
        run = prepare(method_config(name)).run
        server = run.make_server()
        transport = InProcessTransport(ClientHost(run))
        server.round(0, list(range(run.num_clients)), RoundComm(run, transport, 0, Ledger(run.num_clients)))
        save_tree(tmp_path / f"{name}.npz", server.state_dict())
        fresh = run.make_server()
        fresh.load_state_dict(load_tree(tmp_path / f"{name}.npz", build=fresh.setup.rebuild))
        assert _same(server.state_dict(), fresh.state_dict()), name


def _same(a, b) -> bool:
    if isinstance(a, nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def test_zero_dimensional_arrays_keep_their_shape(tmp_path):
    """A BatchNorm's num_batches_tracked is a 0-d array in a weights dict: it comes back 0-d."""
    tree = {"w": {"b.num_batches_tracked": np.array(3, np.int64), "w.x": np.ones((2, 1), np.float32)}}
    save_tree(tmp_path / "s.npz", tree)
    back = load_tree(tmp_path / "s.npz")
    assert back["w"]["b.num_batches_tracked"].shape == () and back["w"]["b.num_batches_tracked"] == 3
    assert back["w"]["w.x"].shape == (2, 1)


def test_client_state_on_disk_is_private_to_its_user(tmp_path):
    import os
    import stat

    from hetpfl.clienthost import DiskStore
    from hetpfl.messages import Message

    store = DiskStore(tmp_path / "states")
    store.put(0, Message({"model/w": np.arange(3, dtype=np.float32)}))
    store.snapshot(tmp_path / "snap")

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(tmp_path / "states") == 0o700
    assert [mode(p) for p in (tmp_path / "states").iterdir()] == [0o600]
    assert [mode(p) for p in (tmp_path / "snap").iterdir()] == [0o600]


def test_a_state_folder_open_to_others_is_closed_and_one_of_another_user_refused(tmp_path):
    import os
    import stat

    from hetpfl.state import StateError, private_folder

    opened = tmp_path / "opened"
    opened.mkdir(mode=0o777)
    opened.chmod(0o777)
    private_folder(opened)
    assert stat.S_IMODE(os.stat(opened).st_mode) == 0o700
    if os.getuid() != 0:
        pytest.skip("making a folder of another user needs root")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    with pytest.raises(StateError, match="belongs to another user \\(uid 65534\\)"):
        private_folder(foreign)


class _WritesAMarker:
    """Unpickling this object creates the file ``path`` (what a planted record would run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_planted_record_holding_a_pickle_runs_no_code_and_fails_clearly(tmp_path):
    """Probe 5.5 (a): a ``client-000000.npz`` planted in a DiskStore folder, holding an object array
    whose unpickling would write a marker file, is refused as unreadable and runs nothing."""
    from hetpfl.clienthost import DiskStore

    store = DiskStore(tmp_path / "states")
    marker = tmp_path / "marker"
    planted = np.empty(1, dtype=object)
    planted[0] = _WritesAMarker(marker)
    np.savez(tmp_path / "states" / "client-000000.npz", w=planted)  # np.savez pickles object arrays
    with pytest.raises(StateError, match=r"client-000000\.npz: not a readable state record \(ValueError: "
                                         r"Object arrays cannot be loaded when allow_pickle=False\)"):
        store.get(0)
    snapshot = tmp_path / "snapshot"
    store.snapshot(snapshot)  # a resumed run restores the same file from a checkpoint: still refused
    fresh = DiskStore(tmp_path / "fresh")
    fresh.restore(snapshot)
    with pytest.raises(StateError, match="not a readable state record"):
        fresh.get(0)
    assert not marker.exists()


@pytest.mark.parametrize("already_there", [None, 0o777], ids=["made", "open-0777"])
def test_a_supernodes_default_state_folder_is_its_users_own_and_private(tmp_path, monkeypatch, already_there):
    """Probe 5.5 (b): with no ``state-dir`` a SuperNode keeps its clients' states in
    ``<tempdir>/hetpfl-flower-<uid>/run-<id>``, both 0700 (an existing open folder is closed)."""
    import os
    import stat
    import tempfile
    from types import SimpleNamespace

    from hetpfl.runtimes import flower

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = tmp_path / f"hetpfl-flower-{os.getuid()}"
    if already_there is not None:
        base.mkdir()
        base.chmod(already_there)

    class Built(Exception):
        pass

    def build_run(experiment, data_dir):  # the folders are made before the run is built
        raise Built

    context = SimpleNamespace(node_config={flower.PARTITION_ID: 0}, run_id=77)
    with pytest.raises(Built):
        flower._client_side("name: x", context, {}, build_run)
    assert [p.name for p in tmp_path.iterdir()] == [base.name]
    assert [p.name for p in base.iterdir()] == ["run-77"]
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(base / "run-77").st_mode) == 0o700
