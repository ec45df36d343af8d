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

Every write is atomic (temp file in the same directory, fsync, rename), so a crash never
leaves a half-written file under a final name. Loads verify the SHA-256 recorded in the
manifest and never execute code (safetensors holds tensors only).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CheckpointError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
    import platform

    import numpy
    import pyarrow
    import safetensors

    from . import __version__

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
        if self.path.is_dir() and any(self.path.iterdir()):
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
        path = self.path / MANIFEST
        if not path.exists():
            raise CheckpointError(f"{path} not found: {self.path} is not a noprop_dist run directory")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise CheckpointError(
                f"{path} has schema version {version!r}, this noprop_dist reads {SCHEMA_VERSION}; "
                "use the matching noprop_dist release")
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
        return path.read_text()

    # ---- tensors ---------------------------------------------------------------------
    def save_unit(self, name: str, tensors: dict[str, torch.Tensor], epochs_done: int,
                  finished: bool) -> dict[str, Any]:
        """Write one unit's tensors atomically, then record its checksum in the manifest."""
        data = tensors_to_bytes(tensors, {"unit": name, "epochs_done": str(epochs_done)})
        rel = f"units/{name}.safetensors"
        atomic_write(self.path / rel, data)
        entry = {"file": rel, "sha256": sha256(data), "bytes": len(data),
                 "epochs_done": epochs_done, "finished": finished}
        manifest = self.manifest()
        manifest["units"][name] = entry
        atomic_write_json(self.path / MANIFEST, manifest)
        return entry

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A top-level tensors file (e.g. the final embedding) with its checksum in the manifest."""
        data = tensors_to_bytes(tensors)
        rel = f"{name}.safetensors"
        atomic_write(self.path / rel, data)
        manifest = self.manifest()
        manifest.setdefault("files", {})[name] = {"file": rel, "sha256": sha256(data), "bytes": len(data)}
        atomic_write_json(self.path / MANIFEST, manifest)

    def _load_entry(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        path = self.path / entry["file"]
        if not path.exists():
            raise CheckpointError(f"{path} is missing; the run directory is incomplete")
        data = path.read_bytes()
        if sha256(data) != entry["sha256"]:
            raise CheckpointError(
                f"{path} is corrupt (SHA-256 does not match the manifest); restore it or retrain with a new --run-dir")
        return tensors_from_bytes(data, str(path))

    def load_unit(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.manifest()["units"].get(name)
        if entry is None:
            raise CheckpointError(f"{self.path} has no checkpoint for {name}; the run did not train it")
        return self._load_entry(entry)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.manifest().get("files", {}).get(name)
        if entry is None:
            raise CheckpointError(f"{self.path} has no {name} file; the run did not finish")
        return self._load_entry(entry)

    # ---- logs ------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line (a crash can at worst lose this line, never earlier ones)."""
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"time": time.time(), **record}) + "\n")
            fh.flush()

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
