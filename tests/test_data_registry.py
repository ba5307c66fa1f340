"""The dataset registry (DatasetSpec), token inputs and per-sample task ids."""

from __future__ import annotations

import numpy as np
import pytest

import hetpfl.data.sources.registry as registry_mod
from hetpfl.configuration import ConfigError
from hetpfl.data import (
    DATASETS,
    INPUT_KINDS,
    ArrayDataset,
    DatasetSource,
    DatasetSpec,
    build_federated_data,
    dataset_info,
    dataset_spec,
    load_dataset,
)

INFO_KEYS = {
    "name",
    "input_kind",
    "input_shape",
    "num_classes",
    "data_dir",
    "files",
    "found",
    "origin",
    "cache_path",
    "download_urls",
    "how_to_provide",
}
NO_FILES = ["digits", "gaussian", "mnist1d"]  # registered datasets that need no data files


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("HETPFL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HETPFL_DATA_DIR", str(tmp_path / "no-data-here"))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_entries_are_specs():
    assert list(DATASETS) == ["digits", "mnist", "fashion_mnist", "cifar10", "mnist1d", "gaussian"]
    assert sorted(DATASETS) == sorted(DATASETS.keys()) and "mnist" in DATASETS
    assert ", ".join(DATASETS).startswith("digits, mnist")
    for name, spec in DATASETS.items():
        assert isinstance(spec, DatasetSpec) and spec.name == name
        assert spec.input_kind in INPUT_KINDS
        assert all(isinstance(d, int) and d > 0 for d in spec.input_shape)
        assert spec.num_classes >= 2 and spec.description
        assert callable(spec.load) and callable(spec.info)
        assert isinstance(spec.options, tuple)
    assert [n for n, s in DATASETS.items() if s.uses_cache] == [
        "mnist", "fashion_mnist", "cifar10", "mnist1d"
    ]


@pytest.mark.parametrize("name", NO_FILES)
def test_spec_without_files_loads_as_declared(name):
    if name == "mnist1d":
        pytest.importorskip("mnist1d")
    spec = DATASETS[name]
    src = load_dataset(name)
    assert src.name == name and src.input_kind == spec.input_kind
    assert src.input_shape == spec.input_shape and src.num_classes == spec.num_classes
    for split in (src.train, src.test):
        assert split.x.shape[1:] == spec.input_shape and split.x.dtype == np.float32
        assert split.y.min() >= 0 and split.y.max() < spec.num_classes
        assert split.task is None
    assert len(src.class_names) == spec.num_classes


@pytest.mark.parametrize("name", list(DATASETS))
def test_dataset_info_every_entry(name, tmp_path):
    spec = DATASETS[name]
    info = dataset_info(name, tmp_path)
    assert set(info) == INFO_KEYS
    assert info["name"] == name and info["input_kind"] == spec.input_kind
    assert info["input_shape"] == spec.input_shape and info["num_classes"] == spec.num_classes
    assert info["data_dir"] == str(tmp_path)
    assert isinstance(info["found"], bool) and isinstance(info["how_to_provide"], str)
    assert info["how_to_provide"]
    if name in ("mnist", "fashion_mnist", "cifar10"):
        assert info["found"] is False and info["download_urls"] and info["files"]


@pytest.mark.parametrize("name", list(DATASETS))
def test_unknown_option_names_dataset_key_and_allowed(name, tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_dataset(name, tmp_path, download=False, bogus_option=1)  # fails before any file access
    msg = str(exc.value)
    assert f"datasets.{name}" in msg and "bogus_option" in msg and "unknown option" in msg
    for opt in DATASETS[name].options:
        assert opt in msg
    if not DATASETS[name].options:
        assert "none" in msg


def test_aliases_and_unknown_names():
    assert dataset_spec("Fashion-MNIST") is DATASETS["fashion_mnist"]
    assert dataset_spec("fashionmnist") is DATASETS["fashion_mnist"]
    assert dataset_spec(" CIFAR-10 ") is DATASETS["cifar10"]
    assert dataset_spec("cifar_10") is DATASETS["cifar10"]
    assert dataset_info("FashionMNIST")["name"] == "fashion_mnist"
    with pytest.raises(ValueError) as exc:
        dataset_spec("imagenet")
    assert "'imagenet'" in str(exc.value) and all(n in str(exc.value) for n in DATASETS)
    with pytest.raises(TypeError, match="string"):
        dataset_spec(3)


def test_spec_rejects_unknown_input_kind():
    with pytest.raises(ValueError, match="'audio'"):
        DatasetSpec("x", "audio", (4,), 2, "d", (), lambda *a, **k: None, lambda d: {})


def _toy_tokens(data_dir, download, use_cache, length=6, vocab=50):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = (rng.integers(0, vocab, (60, length)) + y[:, None]).astype(np.int32)
    return DatasetSource(
        name="toy_tokens",
        input_shape=(length,),
        num_classes=3,
        train=ArrayDataset(x[:45], y[:45]),
        test=ArrayDataset(x[45:], y[45:]),
        class_names=("a", "b", "c"),
        origin="toy",
    )


def test_one_entry_adds_a_token_dataset(monkeypatch, tmp_path):
    spec = DatasetSpec(
        name="toy_tokens",
        input_kind="tokens",
        input_shape=(6,),
        num_classes=3,
        description="random token ids (test)",
        options=("length", "vocab"),
        load=_toy_tokens,
        info=lambda data_dir: {"origin": "generated"},
    )
    monkeypatch.setitem(registry_mod.DATASETS, "toy_tokens", spec)
    src = load_dataset("toy-tokens", length=8)
    assert src.input_kind == "tokens" and src.input_shape == (8,)
    assert src.train.x.dtype == np.int64 and src.train.x.shape == (45, 8)
    info = dataset_info("toy_tokens", tmp_path)
    assert info["input_kind"] == "tokens" and info["origin"] == "generated"
    with pytest.raises(ConfigError, match="width"):
        load_dataset("toy_tokens", width=3)
    fd = build_federated_data(src, num_clients=3, scheme="iid", seed=0, public_fraction=0.2)
    assert fd.input_kind == "tokens"
    assert all(d.x.dtype == np.int64 for d in fd.client_train + fd.client_test)
    assert fd.public.inputs.dtype == np.int64
    assert np.array_equal(fd.public.inputs, src.train.x[fd.public_indices])


# --------------------------------------------------------------------------------------------
# Token inputs and task ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.uint16])
def test_integer_inputs_are_int64_tokens(dtype):
    x = np.arange(12).reshape(4, 3).astype(dtype)
    ds = ArrayDataset(x, np.array([0, 1, 0, 1]))
    assert ds.x.dtype == np.int64 and ds.is_tokens
    assert np.array_equal(ds.x, np.arange(12).reshape(4, 3))
    sub = ds.subset(np.array([3, 0]))
    assert sub.x.dtype == np.int64 and np.array_equal(sub.x, [[9, 10, 11], [0, 1, 2]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.bool_])
def test_float_inputs_are_float32(dtype):
    ds = ArrayDataset(np.ones((3, 2), dtype=dtype), np.zeros(3, dtype=np.int64))
    assert ds.x.dtype == np.float32 and not ds.is_tokens
    assert np.all(ds.x == 1.0)


def test_float32_inputs_are_not_copied():
    x = np.zeros((5, 2), dtype=np.float32)
    tokens = np.zeros((5, 2), dtype=np.int64)
    assert ArrayDataset(x, np.zeros(5, np.int64)).x is x
    assert ArrayDataset(tokens, np.zeros(5, np.int64)).x is tokens


def test_task_ids_validated_and_kept_by_subset():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    y = np.array([0, 1, 2, 3, 4])
    assert ArrayDataset(x, y).task is None and ArrayDataset(x, y).subset([1]).task is None
    ds = ArrayDataset(x, y, task=np.array([0, 0, 1, 1, 2], dtype=np.int32))
    assert ds.task.dtype == np.int64 and ds.task.shape == (5,)
    sub = ds.subset(np.array([4, 2, 0]))
    assert np.array_equal(sub.task, [2, 1, 0]) and np.array_equal(sub.y, [4, 2, 0])
    assert "tasks=3" in repr(ds)
    empty = ArrayDataset(x[:0], y[:0], task=np.array([]))  # an empty float array is fine
    assert empty.task.dtype == np.int64 and len(empty) == 0
    with pytest.raises(ValueError, match="task has 4 entries but y has 5"):
        ArrayDataset(x, y, task=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="task ids must be integers"):
        ArrayDataset(x, y, task=np.zeros(5))
    with pytest.raises(ValueError, match="task ids must be 1-D"):
        ArrayDataset(x, y, task=np.zeros((5, 1), dtype=np.int64))
    with pytest.raises(ValueError, match=">= 0"):
        ArrayDataset(x, y, task=[0, -1, 0, 0, 0])


def test_dataset_source_input_kind_inferred_and_checked():
    floats = ArrayDataset(np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1]))
    images = ArrayDataset(np.zeros((4, 1, 2, 2), np.float32), np.array([0, 1, 0, 1]))
    tokens = ArrayDataset(np.zeros((4, 3), np.int64), np.array([0, 1, 0, 1]))

    def make(train, shape, kind=""):
        return DatasetSource("s", shape, 2, train, train, ("a", "b"), "here", kind)

    assert make(floats, (3,)).input_kind == "vector"
    assert make(images, (1, 2, 2)).input_kind == "image"
    assert make(tokens, (3,)).input_kind == "tokens"
    with pytest.raises(ValueError, match="'tokens' does not match"):
        make(floats, (3,), "tokens")
    with pytest.raises(ValueError, match="does not match"):
        make(tokens, (3,), "vector")
    with pytest.raises(ValueError, match="unknown input_kind 'text'"):
        make(floats, (3,), "text")


def test_digits_are_scikit_learns_arrays_read_without_importing_scikit_learn() -> None:
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sklearn_digits

    from hetpfl.data.sources.generated import _sklearn_digits

    images, target = _sklearn_digits()
    reference = sklearn_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(target, reference.target)
    script = ("import sys\nfrom hetpfl.data.sources import load_dataset\nload_dataset('digits')\n"
              "print('sklearn' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
