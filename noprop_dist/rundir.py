"""Run directories and checkpoints: tensors-only files plus a JSON manifest.

Layout of a run directory::

    config.toml        the resolved config
    manifest.json      schema version, variant, T, schedule, data facts, versions, and per unit:
                       file, SHA-256, size, epochs done, finished
    units/<unit>.safetensors   one per unit (block_01..block_T, head): weights, optimizer state,
                       the unit's copy of the embedding
    embedding.safetensors      the final (synchronised) label embedding
    metrics.jsonl      one JSON object per event (unit epochs, syncs, evaluation)
    summary.json       final figures (test_accuracy is a fraction)
    training.png       per-block loss and test accuracy
    .lock              locked (flock) while a process trains in the run; holds its PID

Every write is atomic (temp file in the same directory, fsync, rename), so a crash never
leaves a half-written file under a final name. Reads trust nothing in the directory: the
manifest is checked against its schema (:data:`MANIFEST_SCHEMA` plus the variant's own,
named in :mod:`noprop_dist.variants.registry`), a file is read only if it is a regular file inside
the run directory of the recorded size, its SHA-256 is verified, and no code is executed
(safetensors holds tensors only). A failed read changes nothing on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import stat
import tempfile
import time
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy
import pyarrow
import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from noprop_dist import __version__
from noprop_dist import config as config_mod
from noprop_dist.config import MAX_CLASSES, MAX_INPUT_VALUES, MAX_T, Config
from noprop_dist.errors import CheckpointError, ConfigError, WriteFailed
from noprop_dist.variants.registry import get_variant, load_target

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
"""Held (flock) by the process training in the run: :class:`noprop_dist.run.lifecycle.RunLock`."""
MAX_FILE_BYTES = 4 * 2**30
"""The largest tensors file a run may hold, checked before a file is read: far above the units
of the paper's models with their optimizer state (~30 MiB for a CIFAR-100 block, ~300 MiB for
the whole back-propagation chain), and a read this machine can hold in memory."""
DAMAGED = "the run directory is damaged — restore manifest.json from a backup or retrain with a new --run-dir"
REPLACE = "restore it from a backup or retrain with a new --run-dir"


# ---- the manifest's schema ----------------------------------------------------------------
# A schema is a dict: key -> spec, where a key ending in "?" may be absent and the key "*"
# stands for every key of a map; a spec is a dict (an object), the name of a check in CHECKS
# (the name is what the error message says was expected), or a (check(value, manifest), says)
# pair. Keys are checked in order, so a check may read keys declared before it. An object
# holds no other keys (the key "..." marks one that may), and the manifest no keys beyond
# the common schema's and its variant's: an unknown key is a damaged or foreign manifest.
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return is_int(value) or isinstance(value, float) and math.isfinite(value)


def is_numbers(value: Any, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(map(is_number, value))


def is_schedule(value: Any, T: int) -> bool:
    """T + 1 values of alpha_bar in (0, 1), strictly increasing (z_0 noise, z_T signal)."""
    return (is_numbers(value, T + 1) and all(0 < a < 1 for a in value)
            and all(a < b for a, b in zip(value, value[1:])))


CHECKS: dict[str, Callable[[Any, dict], bool]] = {
    "a string": lambda v, m: isinstance(v, str),
    "true or false": lambda v, m: isinstance(v, bool),
    "an integer": lambda v, m: is_int(v),
    "an integer >= 0": lambda v, m: is_int(v) and v >= 0,
    "a positive integer": lambda v, m: is_int(v) and v > 0,
    "a number": lambda v, m: is_number(v),
    "a number >= 0": lambda v, m: is_number(v) and v >= 0,
    "a SHA-256 hex digest": lambda v, m: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
    '"running" or "finished"': lambda v, m: v in ("running", "finished"),
    '"uint8" or "float32"': lambda v, m: v in ("uint8", "float32"),
    f"3 positive integers (C, H, W), C*H*W <= {MAX_INPUT_VALUES}": lambda v, m: isinstance(v, list) and len(v) == 3
    and all(is_int(n) and n > 0 for n in v) and math.prod(v) <= MAX_INPUT_VALUES,
    f"an integer in 1..{MAX_T}": lambda v, m: is_int(v) and 0 < v <= MAX_T,
    f"an integer in 0..{MAX_T}": lambda v, m: is_int(v) and 0 <= v <= MAX_T,
    f"a positive integer <= {MAX_CLASSES}": lambda v, m: is_int(v) and 0 < v <= MAX_CLASSES,
    f"a positive integer <= {MAX_INPUT_VALUES}": lambda v, m: is_int(v) and 0 < v <= MAX_INPUT_VALUES,
    "C numbers (C = input_shape[0])": lambda v, m: is_numbers(v, m["input_shape"][0]),
    "C positive numbers (C = input_shape[0])": lambda v, m: is_numbers(v, m["input_shape"][0]) and min(v) > 0,
}

ENTRY_SCHEMA = {"file": "a string", "sha256": "a SHA-256 hex digest", "bytes": "an integer >= 0"}
# What every run's manifest holds at every stage (created, running, finished); the variant's
# schema adds its own fields.
MANIFEST_SCHEMA = {
    "schema_version": "an integer",
    "created": "a number",
    "status": '"running" or "finished"',
    "variant?": "a string",        # absent in manifests written before the variant registry: dt
    "versions": {"*": "a string"},
    "units": {"*": {**ENTRY_SCHEMA, "epochs_done": "an integer >= 0", "finished": "true or false"}},
    "files?": {"*": ENTRY_SCHEMA},
    "train_seconds_done?": "a number >= 0",
}


def describe(value: Any) -> str:
    """A short description of a JSON value for an error message."""
    if isinstance(value, dict):
        return f"an object (keys {', '.join(map(str, list(value)[:6]))}{', ...' if len(value) > 6 else ''})"
    text = json.dumps(value)
    if len(text) <= 40:
        return text
    return f"a list of {len(value)} items" if isinstance(value, list) else text[:37] + "..."


def schema_problem(value: Any, spec: Any, manifest: dict, where: str = "") -> str | None:
    """The first way ``value`` (at ``where`` in ``manifest``) breaks ``spec``, or None."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where or 'the manifest'} is {describe(value)}, expected an object"
        if where and "*" not in spec and "..." not in spec and (extra := unknown_keys(value, [spec])):
            return f"{where} has an unknown key {extra[0]!r}"
        for key, sub in spec.items():
            if key == "...":
                continue
            name = key.rstrip("?")
            if name == "*":
                found = list(value.items())
            elif name in value:
                found = [(name, value[name])]
            elif key.endswith("?"):
                continue
            else:
                return f"{where or 'the manifest'} lacks {name!r}"
            for item, sub_value in found:
                if problem := schema_problem(sub_value, sub, manifest, f"{where}.{item}" if where else item):
                    return problem
        return None
    check, says = (CHECKS[spec], spec) if isinstance(spec, str) else spec
    return None if check(value, manifest) else f"{where} is {describe(value)}, expected {says}"


def unknown_keys(value: dict, specs: list[dict]) -> list[str]:
    """The keys of ``value`` that none of the object ``specs`` declares."""
    known = {key.rstrip("?") for spec in specs for key in spec}
    return [key for key in value if key not in known]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.
    A write that fails (a full disk) raises :class:`WriteFailed` naming ``path``."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):
            raise WriteFailed(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    """Is ``path`` a regular file of the size and SHA-256 a manifest entry records?"""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        return sha256(path.read_bytes()) == entry["sha256"]
    except OSError:
        return False


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[None]:
    """Replace ``path`` (a checkpoint file the manifest records) inside the ``with`` block, which
    then records the new one: if the block fails after the file was replaced (the manifest
    could not be written, a full disk), the old file comes back, so that the manifest's
    checksum still matches. The old file is kept as a hard link meanwhile (no data copied)."""
    backup = path.with_name(f".{path.name}.previous")
    with contextlib.suppress(FileNotFoundError):
        backup.unlink()
    try:
        os.link(path, backup)
    except OSError:
        backup = None        # no old file (a first checkpoint), or no hard links here
    try:
        yield
    except BaseException:
        if backup is not None:
            os.replace(backup, path)   # a no-op when both still name the old file (POSIX rename)
        raise
    finally:
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (strict_json(obj, indent=2, sort_keys=True) + "\n").encode())


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: a non-finite float (NaN, inf) becomes null, never a bare
    ``NaN`` token (Python's default, which strict parsers refuse)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a flat name -> tensor dict as safetensors bytes (contiguous CPU copies).

    ``metadata`` is stored as one sorted-JSON entry: safetensors writes a metadata map of several
    keys in hash order, which would make identical checkpoints differ byte for byte."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    packed = {"noprop_dist": json.dumps(metadata, sort_keys=True)} if metadata else None
    return st_save(clean, metadata=packed)


def tensors_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where} is not a valid safetensors file ({exc}); delete it and retrain that unit") from None


def package_versions() -> dict[str, str]:


    versions = {"noprop_dist": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
                "pyarrow": pyarrow.__version__, "safetensors": safetensors.__version__,
                "python": platform.python_version()}
    try:
        # The installed version without importing Ray: only the coordinator imports it.
        versions["ray"] = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions


class RunDir:
    """A run directory: the single writer of its manifest is the process that trains."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- creation and manifest -------------------------------------------------------
    def refuse_existing(self) -> None:
        """Raise unless a new run may be created here: a new run must never overwrite a run,
        nor write into a directory of someone else's files, nor fail half-way on a path that
        cannot be a directory or cannot be written."""
        if (self.path / MANIFEST).exists():
            raise CheckpointError(f"{self.path} already holds a run; pass --resume {self.path} to continue it "
                                  "or choose another --run-dir")
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"--run-dir {self.path} is a file, not a directory; choose a new directory")
        if self.path.is_dir() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise CheckpointError(f"--run-dir {self.path} is not empty and holds no noprop_dist run; choose an "
                                  "empty or new directory (nothing in it was touched)")
        existing = next((p for p in [self.path, *self.path.parents] if p.exists()), None)
        if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
            what = "is a file" if not existing.is_dir() else "is not writable"
            raise CheckpointError(f"cannot create --run-dir {self.path}: {existing} {what}; choose a directory "
                                  "you can write to")

    def create(self, config_toml: str, manifest_fields: dict[str, Any], resume: bool = False) -> None:
        """Start a new run (refuses to overwrite an existing one unless resuming)."""
        if not resume:
            self.refuse_existing()
        self.path.mkdir(parents=True, exist_ok=True)
        if resume and (self.path / MANIFEST).exists():
            return
        atomic_write(self.path / "config.toml", config_toml.encode())
        manifest = {"schema_version": SCHEMA_VERSION, "created": time.time(), "status": "running",
                    "versions": package_versions(), "units": {}, **manifest_fields}
        atomic_write_json(self.path / MANIFEST, manifest)

    def manifest(self) -> dict[str, Any]:
        """The manifest, checked against the common schema and its variant's (cheap: it is
        read before every checkpoint write too)."""
        path = self.path / MANIFEST
        if not path.exists():
            raise CheckpointError(f"{path} not found: {self.path} is not a noprop_dist run directory")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise CheckpointError(f"{path} is not valid JSON ({what}); the run directory is damaged") from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if isinstance(manifest, dict) and version != SCHEMA_VERSION:
            raise CheckpointError(
                f"{path} has schema version {version!r}, this noprop_dist reads {SCHEMA_VERSION}; "
                "use the matching noprop_dist release")
        problem = schema_problem(manifest, MANIFEST_SCHEMA, manifest)
        if problem is None:
            try:
                variant = get_variant(manifest.get("variant", "dt"))
            except ConfigError as exc:
                raise CheckpointError(f"{path}: {exc}; use the noprop_dist release that wrote this run") from None
            schema = load_target(variant.manifest_schema)
            problem = schema_problem(manifest, schema, manifest)
            if problem is None and (extra := unknown_keys(manifest, [MANIFEST_SCHEMA, schema])):
                problem = f"unknown key {extra[0]!r}"
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}; {DAMAGED}")
        return manifest

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        manifest = self.manifest()
        manifest.update(fields)
        atomic_write_json(self.path / MANIFEST, manifest)
        return manifest

    def config_text(self) -> str:
        path = self.path / "config.toml"
        if not path.exists():
            raise CheckpointError(f"{path} not found; the run directory is incomplete")
        try:
            return path.read_text()
        except UnicodeDecodeError:
            raise CheckpointError(f"{path} is not UTF-8 text; the run directory is damaged — restore config.toml "
                                  "from a backup or retrain with a new --run-dir") from None

    # ---- tensors ---------------------------------------------------------------------
    def save_unit(self, name: str, tensors: dict[str, torch.Tensor], epochs_done: int,
                  finished: bool) -> dict[str, Any]:
        """Write one unit's tensors atomically, then record its checksum in the manifest."""
        self.manifest()   # first: a damaged run is refused before anything is written
        return self.commit_unit(name, self.stage_unit(name, tensors, epochs_done), finished)

    def stage_unit(self, name: str, tensors: dict[str, torch.Tensor], epochs_done: int) -> dict[str, Any]:
        """Write one unit's tensors beside its checkpoint (``units/.NAME.staged.safetensors``,
        atomically), not yet recorded: what :meth:`commit_unit` needs to record it. Reads
        nothing of the run, so that a Ray worker on storage the coordinator shares can write its
        own checkpoint and send only this record (name, size, SHA-256)."""
        data = tensors_to_bytes(tensors, {"unit": name, "epochs_done": str(epochs_done)})
        staged = f"units/.{name}.staged.safetensors"
        atomic_write(self.path / staged, data)
        return {"staged": staged, "sha256": sha256(data), "bytes": len(data), "epochs_done": epochs_done}

    def commit_unit(self, name: str, staged: dict[str, Any], finished: bool) -> dict[str, Any]:
        """Make a staged checkpoint the unit's (a rename, no bytes copied) and record it in the
        manifest; if the manifest cannot be written the old checkpoint comes back. The staged
        file must be the one described: its size is checked (its checksum is, on every load)."""
        manifest = self.manifest()
        rel, source = f"units/{name}.safetensors", self.path / staged["staged"]
        if not source.is_file() or source.stat().st_size != staged["bytes"]:
            raise CheckpointError(f"{source} is missing or not the {staged['bytes']} bytes its writer reported; "
                                  f"the run directory {self.path} is not shared with that worker as it seemed")
        entry = {"file": rel, "sha256": staged["sha256"], "bytes": staged["bytes"],
                 "epochs_done": staged["epochs_done"], "finished": finished}
        manifest["units"][name] = entry
        with replacing(self.path / rel):
            os.replace(source, self.path / rel)
            atomic_write_json(self.path / MANIFEST, manifest)
        return entry

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A top-level tensors file (e.g. the final embedding) with its checksum in the manifest."""
        manifest = self.manifest()
        data = tensors_to_bytes(tensors)
        rel = f"{name}.safetensors"
        manifest.setdefault("files", {})[name] = {"file": rel, "sha256": sha256(data), "bytes": len(data)}
        with replacing(self.path / rel):
            atomic_write(self.path / rel, data)
            atomic_write_json(self.path / MANIFEST, manifest)

    def undo_interrupted_commits(self) -> list[str]:
        """Roll back what a process killed mid-commit left (SIGKILL, power loss; the lock is
        held, so no live process is committing): between putting a new checkpoint in place and
        recording it in the manifest, :func:`replacing` keeps the old file as a hard link
        ``.NAME.previous``. Where the file no longer matches the manifest but that link does,
        the old file comes back (the unit trains the unrecorded epoch again, with the same
        seeds); a link left after a commit that did complete is removed. Returns the files put
        back."""
        manifest = self.manifest()
        restored = []
        for entry in [*manifest["units"].values(), *manifest.get("files", {}).values()]:
            path = self.path / entry["file"]
            backup = path.with_name(f".{path.name}.previous")
            if not backup.is_file() or backup.is_symlink():
                continue
            if _matches(path, entry):
                backup.unlink()
            elif _matches(backup, entry):
                os.replace(backup, path)
                restored.append(entry["file"])
        return restored

    def _entry_file(self, entry: dict[str, Any], label: str) -> Path:
        """The file a manifest entry names, refused unless it is a relative path without '..'
        that resolves (links followed) to a regular file inside the run directory."""
        rel = PurePosixPath(entry["file"])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\0" in entry["file"]:
            raise CheckpointError(f"{self.path / MANIFEST}: {label}.file {entry['file']!r} is not a relative "
                                  f"path inside the run directory; {DAMAGED}")
        path = self.path / rel
        try:
            real = path.resolve(strict=True)
            info = os.stat(real)
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing; the run directory is incomplete") from None
        except (OSError, RuntimeError) as exc:   # a link loop, a path through a file, no permission
            raise CheckpointError(f"{path} cannot be opened ({getattr(exc, 'strerror', None) or exc}); "
                                  f"{REPLACE}") from None
        if not real.is_relative_to(self.path.resolve()):
            raise CheckpointError(f"{path} is a link to {real}, outside the run directory; copy the checkpoint "
                                  "file itself into the run directory or retrain with a new --run-dir")
        if not stat.S_ISREG(info.st_mode):   # never opened: a FIFO would block, /dev/zero never ends
            kind = {"d": "a directory", "p": "a FIFO", "c": "a device", "b": "a device", "s": "a socket"}
            raise CheckpointError(f"{path} is {kind.get(stat.filemode(info.st_mode)[0], 'not a regular file')}, "
                                  f"not a checkpoint file; {REPLACE}")
        return real

    def _load_entry(self, entry: dict[str, Any], label: str) -> dict[str, torch.Tensor]:
        """Read, verify and parse the tensors file of a manifest entry (``label``: where the
        entry is, e.g. ``units.block_01``). Nothing is read before its size is known to be
        the recorded one, below :data:`MAX_FILE_BYTES`."""
        if entry["bytes"] > MAX_FILE_BYTES:
            raise CheckpointError(f"{self.path / MANIFEST}: {label}.bytes is {entry['bytes']}, above the "
                                  f"{MAX_FILE_BYTES}-byte limit of a checkpoint file; {DAMAGED}")
        path = self._entry_file(entry, label)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise CheckpointError(f"{path} cannot be opened ({exc.strerror}); {REPLACE}") from None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())   # the file opened, not a name that may have changed since
            fits = stat.S_ISREG(info.st_mode) and info.st_size == entry["bytes"]
            data = fh.read(entry["bytes"] + 1) if fits else None
        if data is None or len(data) != entry["bytes"]:
            raise CheckpointError(f"{path} has {info.st_size} bytes, the manifest records {entry['bytes']}; "
                                  f"the file is cut or replaced: {REPLACE}")
        if sha256(data) != entry["sha256"]:
            raise CheckpointError(
                f"{path} is corrupt (SHA-256 does not match the manifest); restore it or retrain with a new --run-dir")
        return tensors_from_bytes(data, str(path))

    def load_unit(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.manifest()["units"].get(name)
        if entry is None:
            raise CheckpointError(f"{self.path} has no checkpoint for {name}; the run did not train it")
        return self._load_entry(entry, f"units.{name}")

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.manifest().get("files", {}).get(name)
        if entry is None:
            raise CheckpointError(f"{self.path} has no {name} file; the run did not finish")
        return self._load_entry(entry, f"files.{name}")

    # ---- logs ------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line (a crash can at worst lose this line, never earlier ones). A write
        that fails (a full disk) is cut back off, so that the next line does not join a half one,
        and raises :class:`WriteFailed`."""
        path = self.path / "metrics.jsonl"
        data = (strict_json({"time": time.time(), **record}) + "\n").encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise WriteFailed(exc.errno, exc.strerror, str(path)) from None
        start = None
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as exc:
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            raise WriteFailed(exc.errno, exc.strerror, str(path)) from None
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return records

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)


def load_run_config(run: RunDir) -> Config:
    text = run.config_text()
    try:

        return config_mod.from_dict(tomllib.loads(text))
    except (ConfigError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{run.path / 'config.toml'} is not a valid config ({exc})") from None
