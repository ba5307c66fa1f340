"""The decoded-array cache and corrupt dataset files (probe 1.39–1.48), on tiny fake files.

A cache file that does not hold what decoding produces (sample shape, dtypes, label range, row
counts) is stale: it is ignored with a warning and the files are decoded again (probe 1.46). The
cache key hashes each source file whole, so a change after its first MiB is noticed (probe 1.48).
A corrupt dataset file stops ``hetpfl run`` with one ``hetpfl: …`` line naming the file, before any
training, and no traceback unless ``--debug`` (probe 1.39–1.43).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from hetpfl.cli import main
from hetpfl.data import DatasetFormatError, load_dataset
from hetpfl.data.sources.cache import cache_path

IMAGES = "train-images-idx3-ubyte.gz"
LABELS = "train-labels-idx1-ubyte.gz"
IDX_NAMES = (IMAGES, LABELS, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own cache and data folders (never the user's, never /work/shared/data)."""
    monkeypatch.setenv("HETPFL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HETPFL_DATA_DIR", str(tmp_path / "data"))


def _idx(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _write_mnist(folder: Path, n_train: int = 40, n_test: int = 20, *, gz: bool = True, seed: int = 0) -> list[Path]:
    """Fake MNIST IDX files (gzip, or the accepted uncompressed twins) in ``folder``."""
    rng = np.random.default_rng(seed)
    arrays = (
        rng.integers(0, 256, (n_train, 28, 28)),
        np.arange(n_train) % 10,
        rng.integers(0, 256, (n_test, 28, 28)),
        np.arange(n_test) % 10,
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arr in zip(IDX_NAMES, arrays):
        path = folder / (name if gz else name[: -len(".gz")])
        raw = _idx(arr)
        path.write_bytes(gzip.compress(raw) if gz else raw)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# probe 1.46: a well-formed cache that does not match what decoding produces is stale
# --------------------------------------------------------------------------------------------


def _bad_cache(good: dict[str, np.ndarray], fault: str) -> dict[str, np.ndarray]:
    bad = dict(good)
    n = good["x_train"].shape[0]
    if fault == "10x10 images":  # the probe's case
        bad["x_train"] = np.zeros((n, 10, 10), np.uint8)
        bad["x_test"] = np.zeros((good["x_test"].shape[0], 10, 10), np.uint8)
    elif fault == "10x10 train images only":
        bad["x_train"] = np.zeros((n, 10, 10), np.uint8)
    elif fault == "float pixels":
        bad["x_train"] = good["x_train"].astype(np.float64)
    elif fault == "labels 200":  # probe 1.45
        bad["y_train"] = np.full_like(good["y_train"], 200)
    elif fault == "negative labels":
        bad["y_test"] = np.full(good["y_test"].shape, -1, np.int64)
    elif fault == "fewer labels than images":
        bad["y_train"] = good["y_train"][:-3]
    elif fault == "2-D labels":
        bad["y_train"] = good["y_train"][:, None]
    else:
        raise AssertionError(fault)
    return bad


FAULTS = ["10x10 images", "10x10 train images only", "float pixels", "labels 200", "negative labels",
          "fewer labels than images", "2-D labels"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_cache_that_decoding_would_not_produce_is_stale_and_decoded_again(tmp_path, fault):
    files = _write_mnist(tmp_path / "data" / "mnist")
    first = load_dataset("mnist", tmp_path / "data", download=False)
    path = cache_path("mnist", files)
    assert "cached to" in first.origin and path.is_file()
    with np.load(path) as z:
        good = {k: z[k] for k in z.files}
    np.savez(path, **_bad_cache(good, fault))  # well-formed .npz at the right key

    with pytest.warns(UserWarning, match="stale cache file"):
        again = load_dataset("mnist", tmp_path / "data", download=False)
    assert "cached to" in again.origin  # decoded again and rewritten
    assert again.train.x.shape == (40, 1, 28, 28) and again.test.x.shape == (20, 1, 28, 28)
    assert np.array_equal(again.train.x, first.train.x) and np.array_equal(again.train.y, first.train.y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache is good: read without a warning
        third = load_dataset("mnist", tmp_path / "data", download=False)
    assert "decoded cache" in third.origin and np.array_equal(third.test.y, first.test.y)


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_cifar_images(path: Path, per_class: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            for c, cls in enumerate(("airplane", "cat", "truck")):
                for i in range(per_class):
                    _add(tf, f"{split}/{cls}/{i:04d}.jpg", _jpeg((80 * c, 40 * i, 200)))


def test_a_cifar_cache_with_other_shapes_is_stale(tmp_path):
    _write_cifar_images(tmp_path / "data" / "cifar10" / "cifar10-jpeg-q75.tar.gz")
    first = load_dataset("cifar10", tmp_path / "data", download=False)
    (path,) = (tmp_path / "cache").glob("cifar10-*.npz")
    with np.load(path) as z:
        good = {k: z[k] for k in z.files}
    np.savez(path, **{**good, "x_train": good["x_train"][:, :, :16, :16].copy()})
    with pytest.warns(UserWarning, match="stale cache file"):
        again = load_dataset("cifar10", tmp_path / "data", download=False)
    assert again.train.x.shape == (6, 3, 32, 32) and np.array_equal(again.train.x, first.train.x)


def _cifar_batch(n: int, labels: list[int]) -> bytes:
    data = np.random.default_rng(n).integers(0, 256, (n, 3072), dtype=np.uint8)
    return pickle.dumps({b"data": data, b"labels": labels}, protocol=2)


def test_pickled_cifar_labels_outside_0_9_are_refused_and_nothing_is_cached(tmp_path):
    tarball = tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir(parents=True)
    with tarfile.open(tarball, "w:gz") as tf:
        for i in range(1, 6):
            _add(tf, f"cifar-10-batches-py/data_batch_{i}", _cifar_batch(4, [0, 1, 12 if i == 3 else 2, 3]))
        _add(tf, "cifar-10-batches-py/test_batch", _cifar_batch(4, [0, 1, 2, 3]))
    with pytest.raises(DatasetFormatError, match=r"label 12 outside 0\.\.9") as exc:
        load_dataset("cifar10", tmp_path / "data", download=False)
    assert str(tarball) in str(exc.value)
    assert not list((tmp_path / "cache").glob("*.npz"))


# --------------------------------------------------------------------------------------------
# probe 1.48: the cache key covers each file whole
# --------------------------------------------------------------------------------------------


def test_a_change_after_the_first_mib_invalidates_the_cache(tmp_path):
    # uncompressed IDX twins, so that one byte can change without changing the size or the format
    files = _write_mnist(tmp_path / "data" / "mnist", n_train=1600, gz=False)
    images = files[0]
    assert images.stat().st_size > (1 << 20) + 1000
    first = load_dataset("mnist", tmp_path / "data", download=False)
    assert "cached to" in first.origin
    old_key = cache_path("mnist", files)

    offset = images.stat().st_size - 10  # a pixel of the last training image, well past 1 MiB
    raw = bytearray(images.read_bytes())
    raw[offset] ^= 0xFF
    size = images.stat().st_size
    images.write_bytes(bytes(raw))
    assert images.stat().st_size == size

    assert cache_path("mnist", files) != old_key
    again = load_dataset("mnist", tmp_path / "data", download=False)
    assert "cached to" in again.origin  # not the stale cache
    def last_pixel(src):
        return np.rint(src.train.x[-1, 0].reshape(-1)[-10] * 255)

    assert last_pixel(again) == raw[offset] != last_pixel(first)


def test_touching_a_file_without_changing_it_keeps_the_cache(tmp_path):
    files = _write_mnist(tmp_path / "data" / "mnist")
    key = cache_path("mnist", files)
    load_dataset("mnist", tmp_path / "data", download=False)
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns + 10**10, st.st_mtime_ns + 10**10))  # e.g. a copy that keeps bytes
    assert cache_path("mnist", files) == key
    assert "decoded cache" in load_dataset("mnist", tmp_path / "data", download=False).origin


# --------------------------------------------------------------------------------------------
# probe 1.39–1.43: a corrupt dataset file is one line from the CLI
# --------------------------------------------------------------------------------------------


def _config(tmp_path: Path, dataset: str) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "name: corrupt-data\nseed: 0\nrounds: 1\nalgorithm: {name: fedavg}\n"
        f"data: {{dataset: {dataset}, num_clients: 2, partition: iid}}\n"
        "models: {clients: [mlp]}\nclient: {local_epochs: 1, batch_size: 8, lr: 0.01}\n"
    )
    return path


def _truncated_gzip(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flipped_gzip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _short_idx(path: Path) -> None:
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1000]))


def _label_12(path: Path) -> None:
    labels = np.arange(40) % 10
    labels[7] = 12
    path.write_bytes(gzip.compress(_idx(labels)))


CORRUPTIONS = {
    "1.39 truncated gzip": (IMAGES, _truncated_gzip, "corrupt gzip file"),
    "1.40 flipped gzip bytes": (IMAGES, _flipped_gzip, "corrupt gzip file"),
    "1.41 IDX short by 1000 bytes": (IMAGES, _short_idx, "but the file holds 30360 data bytes"),
    "1.42 label 12": (LABELS, _label_12, r"label 12 outside 0..9"),
}


def _run_cli(tmp_path: Path, dataset: str, *extra: str) -> int:
    return main([*extra, "run", str(_config(tmp_path, dataset)), "-o", str(tmp_path / "out"),
                 "--data-dir", str(tmp_path / "data")])


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_mnist_file_is_one_line_naming_it_and_no_traceback(tmp_path, capsys, case):
    fname, corrupt, what = CORRUPTIONS[case]
    _write_mnist(tmp_path / "data" / "mnist")
    target = tmp_path / "data" / "mnist" / fname
    corrupt(target)

    rc = _run_cli(tmp_path, "mnist")
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("hetpfl: "), err
    assert "config error" not in err  # a damaged file, not a config value
    assert str(target) in err and what in err
    assert "Traceback" not in err + captured.out
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing was cached
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before training

    # the traceback is behind --debug: the reader's own error, raised
    with pytest.raises(DatasetFormatError, match=str(target).replace(".", r"\.")):
        _run_cli(tmp_path, "mnist", "--debug")


def test_an_image_archive_cut_anywhere_is_refused_never_read_short(tmp_path):
    """A cut between two tar members used to read as the end of the archive: a smaller test set,
    silently (and cached). The compressed stream is now read to its end marker."""
    from hetpfl.data.sources.cifar import read_image_folder_tar

    whole = tmp_path / "whole.tar.gz"
    _write_cifar_images(whole, per_class=10)
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    for size in range(len(data) // 3, len(data) - 1, 5):
        cut.write_bytes(data[:size])
        with pytest.raises(DatasetFormatError, match="corrupt image archive"):
            read_image_folder_tar(cut)
    assert read_image_folder_tar(whole)["x_test"].shape == (30, 3, 32, 32)


def test_a_truncated_cifar_archive_is_one_line_naming_it(tmp_path, capsys):
    archive = tmp_path / "data" / "cifar10" / "cifar10-jpeg-q75.tar.gz"
    _write_cifar_images(archive, per_class=20)
    _truncated_gzip(archive)
    assert _run_cli(tmp_path, "cifar10") != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hetpfl: ") and "Traceback" not in err, err
    assert f"corrupt image archive {archive}" in err
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_datasets_load_without_numpys_huge_page_hint_and_the_setting_is_restored() -> None:
    from hetpfl.data.sources.base import _numpy_multiarray, small_pages

    switch = _numpy_multiarray._set_madvise_hugepage
    before = switch(True)
    try:
        with small_pages():
            assert switch(False) is False  # off within (the call returns the setting it replaces)
        assert switch(True) is True  # on again after
        with pytest.raises(RuntimeError), small_pages():
            raise RuntimeError("a failed load")
        assert switch(True) is True  # restored after an error too
    finally:
        switch(before)
