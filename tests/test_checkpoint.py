"""Tests of run directories, checkpoints, the summary and the export
(noprop_dist.rundir, noprop_dist.run.results).

All tests share the session's trained tiny run; those that damage a run work on a copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from noprop_dist import rundir as checkpoint
from noprop_dist.rundir import SCHEMA_VERSION, RunDir, atomic_write, sha256
from noprop_dist.cli import main
from noprop_dist.config import from_dict, to_toml
from noprop_dist.data import normalize
from noprop_dist.errors import CheckpointError
from noprop_dist.nets.chain import RawImageChain, draw_noise, predict
from noprop_dist.trainers.local import train_local
from noprop_dist.variants.dt import load_chain
from noprop_dist.run.results import evaluate_run, export_run
from test_config_cli import one_error_line

UNIT_NAMES = ["block_01", "block_02", "block_03", "block_04", "head"]


def test_tiny_preset_has_four_blocks(tiny_cfg):
    assert tiny_cfg.schedule.T == len(UNIT_NAMES) - 1


# ------------------------------------------------------------------ reload and evaluate

def test_reloaded_chain_predicts_the_same(trained_run, digits):
    """Two independent reloads of the run give the same predictions, and they are good ones."""
    run_dir, _ = trained_run
    first, cfg, _ = load_chain(run_dir)
    second, _, _ = load_chain(run_dir)
    x = normalize(np.asarray(digits.test.x), digits.mean, digits.std)
    p1 = predict(first, x, seed=cfg.eval.seed)
    p2 = predict(second, x, seed=cfg.eval.seed)
    assert torch.equal(p1, p2)
    accuracy = float((p1 == torch.from_numpy(np.array(digits.test.y))).float().mean())
    assert accuracy > 0.5
    assert not first.training and not second.training


def test_evaluate_run_reproduces_the_summary(trained_run):
    """`noprop-dist eval` on the finished run gives exactly the accuracy in summary.json."""
    run_dir, summary = trained_run
    scores = evaluate_run(run_dir)
    assert scores["test_accuracy"] == summary["test_accuracy"]
    assert scores["chain_accuracy_no_noise"] == summary["chain_accuracy_no_noise"]
    assert scores["block_alone_accuracy"] == summary["block_alone_accuracy"]
    assert scores["examples"] == summary["test_examples"]


# ------------------------------------------------------------------ files of a run

def test_summary_fields(trained_run, tiny_cfg, digits):
    """summary.json: test_accuracy a fraction, train_seconds, variant, T, dataset, ..."""
    run_dir, summary = trained_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0
    assert on_disk["test_accuracy"] == on_disk["chain_accuracy_noise"]  # eval.noise = true
    assert on_disk["train_seconds"] > 0 and math.isfinite(on_disk["train_seconds"])
    assert on_disk["variant"] == "dt" and on_disk["T"] == tiny_cfg.schedule.T
    assert on_disk["dataset"] == "digits"
    assert on_disk["train_examples"] == len(digits.train) and on_disk["test_examples"] == len(digits.test)
    assert on_disk["unit_epochs_done"] == {name: tiny_cfg.train.epochs for name in UNIT_NAMES}
    assert set(on_disk["block_alone_accuracy"]) == set(UNIT_NAMES[:-1])


def test_metrics_have_every_unit_epoch(trained_run, tiny_cfg):
    """metrics.jsonl holds one record per (unit, epoch) with a finite loss, then the evaluation."""
    run_dir, _ = trained_run
    records = RunDir(run_dir).read_metrics()
    epochs = [r for r in records if r["event"] == "unit_epoch"]
    seen = sorted((r["unit"], r["epoch"]) for r in epochs)
    assert seen == sorted((u, e) for u in UNIT_NAMES for e in range(1, tiny_cfg.train.epochs + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["seconds"] >= 0 for r in epochs)
    assert records[-1]["event"] == "evaluation"


def test_manifest_and_config_describe_the_run(trained_run, tiny_cfg):
    """The manifest records schema, status, and a checksum per unit that matches its file; the
    saved config.toml is the resolved config."""
    run_dir, _ = trained_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["status"] == "finished"
    assert sorted(manifest["units"]) == sorted(UNIT_NAMES)
    for name, entry in manifest["units"].items():
        data = (run_dir / entry["file"]).read_bytes()
        assert entry["sha256"] == sha256(data) and entry["bytes"] == len(data)
        assert entry["epochs_done"] == tiny_cfg.train.epochs and entry["finished"] is True
    assert "embedding" in manifest["files"]
    saved = from_dict(tomllib.loads((run_dir / "config.toml").read_text()))
    assert saved == tiny_cfg
    assert not list(run_dir.rglob("*.tmp"))


def test_training_png(trained_run):
    png = (trained_run[0] / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


# ------------------------------------------------------------------ damaged runs

def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("unit", ["block_02", "head"])
def test_byte_flipped_unit_is_rejected(run_copy, unit):
    """A single flipped byte in a unit file fails the checksum; the error names the file."""
    path = run_copy / "units" / f"{unit}.safetensors"
    flip_byte(path, len(path.read_bytes()) // 2)
    with pytest.raises(CheckpointError, match=f"{unit}.safetensors") as exc:
        load_chain(run_copy)
    assert "\n" not in str(exc.value)
    with pytest.raises(CheckpointError, match=f"{unit}.safetensors"):
        evaluate_run(run_copy)


def test_truncated_unit_is_rejected(run_copy):
    path = run_copy / "units" / "block_03.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="block_03.safetensors"):
        load_chain(run_copy)


def test_truncated_unit_with_matching_checksum_is_rejected(run_copy):
    """Even with the manifest's checksum forged to match, a cut file is refused by the
    safetensors reader (tensors only, never unpickled), naming the file."""
    path = run_copy / "units" / "block_01.safetensors"
    cut = path.read_bytes()[:200]
    path.write_bytes(cut)
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["units"]["block_01"].update(sha256=sha256(cut), bytes=len(cut))
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="block_01.safetensors.*not a valid safetensors"):
        load_chain(run_copy)


def test_flipped_embedding_file_is_rejected(run_copy):
    path = run_copy / "embedding.safetensors"
    flip_byte(path, len(path.read_bytes()) - 1)
    with pytest.raises(CheckpointError, match="embedding.safetensors"):
        load_chain(run_copy)


def test_missing_unit_file_is_rejected(run_copy):
    (run_copy / "units" / "block_04.safetensors").unlink()
    with pytest.raises(CheckpointError, match="block_04.safetensors"):
        load_chain(run_copy)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, None])
def test_other_schema_version_is_rejected(run_copy, version):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["schema_version"] = version
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="schema version"):
        load_chain(run_copy)


def test_unparsable_manifest_is_rejected(run_copy):
    (run_copy / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_chain(run_copy)


def test_missing_run_dir_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="not a noprop_dist run directory"):
        load_chain(tmp_path / "no_such_run")
    with pytest.raises(CheckpointError):
        evaluate_run(tmp_path / "no_such_run")


def test_create_refuses_to_overwrite_a_run(run_copy, tiny_cfg):
    """RunDir.create and train_local refuse an existing run without resume, touching nothing."""
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="already holds a run"):
        RunDir(run_copy).create(to_toml(tiny_cfg), {})
    with pytest.raises(CheckpointError, match="already holds a run"):
        train_local(tiny_cfg, run_copy, show_progress=False)
    RunDir(run_copy).create("garbage", {"variant": "other"}, resume=True)  # resume: a no-op
    after = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    assert after == before


def test_checkpoint_bytes_are_reproducible():
    """The same tensors and metadata always serialise to the same bytes (so identical runs have
    identical files), and load back exactly."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model/layer{i}.weight": torch.randn(3, 4, generator=gen) for i in range(12)}
    tensors["epochs_done"] = torch.tensor(5)
    meta = {"unit": "block_01", "epochs_done": "5", "extra": "x"}
    blobs = {checkpoint.tensors_to_bytes(tensors, meta) for _ in range(30)}
    assert len(blobs) == 1
    back = checkpoint.tensors_from_bytes(blobs.pop(), "test")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


# ------------------------------------------------------------------ atomic writes

def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch, failing):
    """A crash mid-write (here: os.replace or os.fsync raising) leaves the old file intact and
    no temp file behind."""
    target = tmp_path / "file.bin"
    atomic_write(target, b"old content")

    def boom(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(checkpoint.os, failing, boom)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write(target, b"new content that must not appear")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


# ------------------------------------------------------------------ export

def test_export_matches_the_chain(trained_run, digits, tmp_path):
    """The torch.export file, run on raw uint8 images, gives the chain's logits (any batch size)."""
    run_dir, _ = trained_run
    out = export_run(run_dir, tmp_path / "model.pt2")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temp file left
    exported = torch.export.load(str(out)).module()
    chain, cfg, _ = load_chain(run_dir)
    d = chain.embedding.shape[1]
    gen = torch.Generator().manual_seed(3)
    for n in (7, 50):
        raw = torch.from_numpy(np.array(digits.test.x[:n]))                   # (n, 1, 8, 8) uint8
        assert raw.dtype == torch.uint8
        noise = draw_noise(chain.T, n, d, gen, with_eps=True)                  # (T+1, n, d)
        with torch.no_grad():
            got = exported(raw, noise)
            via_raw = RawImageChain(chain).eval()(raw, noise)
            direct = chain(normalize(raw.numpy(), digits.mean, digits.std), noise)
        assert got.shape == (n, digits.num_classes)
        torch.testing.assert_close(got, via_raw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-5)


def test_export_of_a_float_run_takes_float_images(run_copy, digits, tmp_path):
    """A run on float32 data (recorded in the manifest) exports a program for float images."""
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert manifest["input_dtype"] == "uint8"
    manifest["input_dtype"] = "float32"
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    exported = torch.export.load(str(export_run(run_copy, tmp_path / "float.pt2"))).module()
    chain, _, _ = load_chain(run_copy)
    raw = torch.from_numpy(np.array(digits.test.x[:6]))
    noise = draw_noise(chain.T, 6, chain.embedding.shape[1], torch.Generator().manual_seed(1), True)
    with torch.no_grad():
        expected = RawImageChain(chain).eval()(raw, noise)
        torch.testing.assert_close(exported(raw.float() / 255.0, noise), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_local_run_does_not_import_ray(tmp_path, data_cache):
    """Only the coordinator imports Ray: an in-process run (manifest versions included) must
    not, yet the manifest still records Ray's version."""
    code = (
        "import sys\n"
        "from noprop_dist.config import resolve\n"
        "from noprop_dist.trainers.local import train_local\n"
        f"cfg = resolve('tiny', {{'data.cache_dir': {data_cache!r}, 'train.epochs': '1',"
        " 'train.head_passes': '1'})\n"
        f"train_local(cfg, {str(tmp_path / 'run')!r}, show_progress=False)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["versions"]["ray"]


# ------------------------------------------------------------------ untrusted run directories (issue 7, items 12-13)
# A run directory may come from anywhere: its manifest is checked against its schema, and a
# file is read only if it is a regular file inside the run directory of the recorded size.
# Every refusal is one line naming the problem and the fix, and changes nothing on disk.

DAMAGED_FIX = "restore manifest.json from a backup or retrain with a new --run-dir"
NOT_INSIDE = "is not a relative path inside the run directory"


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: a regular file's bytes, a link's target, else its kind
    (a FIFO is never opened)."""
    out = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        out[path] = (path.read_bytes() if stat.S_ISREG(mode) else
                     os.readlink(path) if stat.S_ISLNK(mode) else stat.filemode(mode))
    return out


def edit_manifest(run: Path, change) -> None:
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def refused(run: Path, load, *fragments: str) -> str:
    """``load()`` raises a one-line CheckpointError naming every fragment, and nothing next
    to the run directory (the run, the copies outside it) changed."""
    before = snapshot(run.parent)
    with pytest.raises(CheckpointError) as exc:
        load()
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert snapshot(run.parent) == before
    return message


# ---- files named by the manifest

def _outside_copy(run: Path) -> Path:
    """A valid copy of block_01's file outside the run directory: reading it would succeed."""
    outside = run.parent / "outside.safetensors"
    shutil.copyfile(run / "units" / "block_01.safetensors", outside)
    return outside


def _name_file(run: Path, file: str, source: Path | None = None) -> None:
    """Make units.block_01 name ``file``, with the checksum and size of ``source`` (if given)."""
    data = source.read_bytes() if source else None
    edit_manifest(run, lambda m: m["units"]["block_01"].update(
        file=file, **({"sha256": sha256(data), "bytes": len(data)} if data is not None else {})))


def _replace_unit(run: Path, make) -> None:
    path = run / "units" / "block_01.safetensors"
    path.unlink()
    make(path)


def _link_outside(run: Path) -> None:
    """units/block_01.safetensors becomes a link to a valid copy outside the run directory."""
    outside = _outside_copy(run)
    _replace_unit(run, lambda path: path.symlink_to(outside))


def _grow(run: Path) -> None:
    with open(run / "units" / "block_01.safetensors", "ab") as fh:
        fh.write(b"\0")


# case -> (damage(run), fragments of the message, formatted with {size}: block_01's file size);
# each reads units.block_01.
UNIT_FILE_CASES = {
    "dotdot_passwd": (lambda run: _name_file(run, "../" * len(run.parts) + "etc/passwd", Path("/etc/passwd")),
                      ("units.block_01.file", "etc/passwd", NOT_INSIDE, DAMAGED_FIX)),
    "dotdot_valid_copy": (lambda run: _name_file(run, "../outside.safetensors", _outside_copy(run)),
                          ("units.block_01.file '../outside.safetensors'", NOT_INSIDE)),
    "absolute_valid_copy": (lambda run: _name_file(run, str(_outside_copy(run)), _outside_copy(run)),
                            ("outside.safetensors", NOT_INSIDE)),
    "dev_zero": (lambda run: _name_file(run, "/dev/zero"), ("units.block_01.file '/dev/zero'", NOT_INSIDE)),
    "link_outside": (_link_outside,
                     ("block_01.safetensors is a link to", "outside.safetensors, outside the run directory")),
    "link_dev_zero": (lambda run: _replace_unit(run, lambda p: p.symlink_to("/dev/zero")),
                      ("is a link to /dev/zero, outside the run directory",)),
    "units_dir_link_outside": (lambda run: (shutil.move(run / "units", run.parent / "units_moved"),
                                            (run / "units").symlink_to(run.parent / "units_moved")),
                               ("units_moved/block_01.safetensors, outside the run directory",)),
    "fifo": (lambda run: _replace_unit(run, os.mkfifo), ("block_01.safetensors is a FIFO, not a checkpoint file",)),
    "directory": (lambda run: _replace_unit(run, Path.mkdir), ("block_01.safetensors is a directory",)),
    "file_longer_than_recorded": (_grow, ("has {grown} bytes, the manifest records {size}",)),
    "recorded_size_wrong": (lambda run: edit_manifest(run, lambda m: m["units"]["block_01"].update(bytes=5)),
                            ("has {size} bytes, the manifest records 5",)),
    "recorded_size_huge": (lambda run: edit_manifest(run, lambda m: m["units"]["block_01"].update(bytes=2**50)),
                           (f"units.block_01.bytes is {2**50}, above the", DAMAGED_FIX)),
}
# Cases that the code before this check could not survive (/dev/zero read without end, a FIFO
# blocked in open): run in a child process bounded in memory and time, so a regression fails.
IN_CHILD = {"dev_zero", "link_dev_zero", "fifo"}
CHILD = """
import resource, sys
from noprop_dist.rundir import RunDir
from noprop_dist.errors import CheckpointError
resource.setrlimit(resource.RLIMIT_DATA, (2**31, resource.RLIM_INFINITY))
try:
    RunDir(sys.argv[1]).load_unit("block_01")
except CheckpointError as exc:
    print(exc)
else:
    print("loaded")
"""


def _load_in_child(run: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    raise CheckpointError(proc.stdout.strip())


@pytest.mark.parametrize("case", UNIT_FILE_CASES)
def test_unit_files_outside_the_run_or_not_regular_are_never_read(run_copy, case):
    """Item 12: a unit entry naming a file outside the run (even a valid copy, with a matching
    checksum), a link out, a device, a FIFO, a directory or a file of another size is refused
    before it is read."""
    damage, fragments = UNIT_FILE_CASES[case]
    size = (run_copy / "units" / "block_01.safetensors").stat().st_size
    damage(run_copy)
    load = (lambda: _load_in_child(run_copy)) if case in IN_CHILD else (lambda: load_chain(run_copy))
    message = refused(run_copy, load, *(f.format(size=size, grown=size + 1) for f in fragments))
    assert "delete" not in message   # never advise deleting a file, least of all one outside the run


def test_embedding_entry_outside_the_run_is_refused(run_copy):
    outside = run_copy.parent / "embedding_outside.safetensors"
    shutil.copyfile(run_copy / "embedding.safetensors", outside)
    edit_manifest(run_copy, lambda m: m["files"]["embedding"].update(file="../embedding_outside.safetensors"))
    refused(run_copy, lambda: load_chain(run_copy), "files.embedding.file", NOT_INSIDE)


def test_a_link_inside_the_run_directory_is_followed(run_copy):
    """Links are resolved, not refused: one to a regular file inside the run is read."""
    expected = RunDir(run_copy).load_unit("block_01")
    (run_copy / "stash").mkdir()
    shutil.move(run_copy / "units" / "block_01.safetensors", run_copy / "stash" / "b1.safetensors")
    (run_copy / "units" / "block_01.safetensors").symlink_to(Path("..") / "stash" / "b1.safetensors")
    got = RunDir(run_copy).load_unit("block_01")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


# ---- the manifest's schema

REQUIRED_KEYS = ["T", "block", "created", "dataset", "embedding", "embedding_dim", "input_dtype", "input_shape",
                 "normalization", "num_classes", "schedule", "schema_version", "status", "units", "versions"]
OPTIONAL_KEYS = ["files", "train_seconds_done", "variant"]   # absent while running / in older runs (dt)


def test_key_lists_cover_a_real_manifest(trained_run):
    manifest = json.loads((trained_run[0] / "manifest.json").read_text())
    assert sorted(REQUIRED_KEYS + OPTIONAL_KEYS) == sorted(manifest)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_manifest_without_a_required_key_is_refused(run_copy, key):
    edit_manifest(run_copy, lambda m: m.pop(key))
    expected = "schema version None" if key == "schema_version" else f"manifest.json: the manifest lacks {key!r}"
    refused(run_copy, lambda: evaluate_run(run_copy), expected)


@pytest.mark.parametrize("key", OPTIONAL_KEYS)
def test_manifest_without_an_optional_key_is_read(run_copy, key):
    edit_manifest(run_copy, lambda m: m.pop(key))
    assert key not in RunDir(run_copy).manifest()
    if key == "files":
        refused(run_copy, lambda: load_chain(run_copy), "has no embedding file; the run did not finish")


@pytest.mark.parametrize("entry,key", [("units.block_03", k) for k in
                                       ("file", "sha256", "bytes", "epochs_done", "finished")]
                         + [("files.embedding", k) for k in ("file", "sha256", "bytes")])
def test_manifest_entry_without_a_key_is_refused(run_copy, entry, key):
    group, name = entry.split(".")
    edit_manifest(run_copy, lambda m: m[group][name].pop(key))
    refused(run_copy, lambda: evaluate_run(run_copy), f"manifest.json: {entry} lacks {key!r}; ", DAMAGED_FIX)


def _set(manifest: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        manifest = manifest[key]
    manifest[last] = value


BAD_VALUES = [   # (dotted key, value, what the message says)
    ("T", "4", 'T is "4", expected an integer in 1..1000'),
    ("T", True, "T is true, expected an integer in 1..1000"),
    ("T", 0, "T is 0, expected an integer in 1..1000"),
    ("created", "yesterday", 'created is "yesterday", expected a number'),
    ("status", "done", 'status is "done", expected "running" or "finished"'),
    ("variant", 3, "variant is 3, expected a string"),
    ("variant", "nope", "variant='nope' is not one of dt, ct, fm, backprop, backprop_cnn; use the noprop_dist release"),
    ("versions", ["torch"], 'versions is ["torch"], expected an object'),
    ("versions.torch", 2, "versions.torch is 2, expected a string"),
    ("units", [], "units is [], expected an object"),
    ("units.block_01", None, "units.block_01 is null, expected an object"),
    ("units.block_01.file", 7, "units.block_01.file is 7, expected a string"),
    ("units.block_01.bytes", "148896", 'units.block_01.bytes is "148896", expected an integer >= 0'),
    ("units.block_01.bytes", -1, "units.block_01.bytes is -1, expected an integer >= 0"),
    ("units.block_01.bytes", 1.5, "units.block_01.bytes is 1.5, expected an integer >= 0"),
    ("units.block_01.sha256", "abc", 'units.block_01.sha256 is "abc", expected a SHA-256 hex digest'),
    ("units.block_01.epochs_done", "5", 'units.block_01.epochs_done is "5", expected an integer >= 0'),
    ("units.block_01.finished", "yes", 'units.block_01.finished is "yes", expected true or false'),
    ("units.block_09", {"file": "units/block_09.safetensors", "sha256": "0" * 64, "bytes": 1, "epochs_done": 1,
                        "finished": True}, "units is an object (keys block_01, block_02, block_03, block_04, head, "
                                           "block_09), expected units named block_01..block_T and head"),
    ("units.network", None, "units.network is null, expected an object"),
    ("files", {"embedding": "embedding.safetensors"},
     'files.embedding is "embedding.safetensors", expected an object'),
    ("files.embedding.sha256", None, "files.embedding.sha256 is null, expected a SHA-256 hex digest"),
    ("schedule", "cosine", 'schedule is "cosine", expected an object'),
    ("schedule.alpha_bar", [0.1, 0.5], "schedule.alpha_bar is [0.1, 0.5], expected T + 1 increasing numbers in (0, 1)"),
    ("schedule.alpha_bar", [0.1, 0.2, 0.3, 0.4, 1.5], "schedule.alpha_bar is [0.1, 0.2, 0.3, 0.4, 1.5], expected"),
    ("schedule.alpha_bar", [0.1, 0.2, "0.3", 0.4, 0.5], 'schedule.alpha_bar is [0.1, 0.2, "0.3", 0.4, 0.5], expected'),
    ("schedule.alpha_bar", [0.1, 0.2, float("nan"), 0.4, 0.5], "schedule.alpha_bar is [0.1, 0.2, NaN, 0.4, 0.5], exp"),
    ("schedule.alpha_bar", [0.1] * 40, "schedule.alpha_bar is a list of 40 items, expected T + 1 increasing numbers in (0, 1)"),
    ("schedule.alpha_bar", None, "schedule.alpha_bar is null, expected T + 1 increasing numbers in (0, 1)"),
    ("input_shape", [1, 8], "input_shape is [1, 8], expected 3 positive integers (C, H, W)"),
    ("input_shape", [1, 0, 8], "input_shape is [1, 0, 8], expected 3 positive integers"),
    ("input_shape", "1x8x8", 'input_shape is "1x8x8", expected 3 positive integers'),
    ("input_dtype", "float64", 'input_dtype is "float64", expected "uint8" or "float32"'),
    ("num_classes", "10", 'num_classes is "10", expected a positive integer'),
    ("embedding_dim", 0, "embedding_dim is 0, expected a positive integer"),
    ("normalization", None, "normalization is null, expected an object"),
    ("normalization.mean", [0.3, 0.3, 0.3], "normalization.mean is [0.3, 0.3, 0.3], expected C numbers "
                                            "(C = input_shape[0])"),
    ("normalization.std", [0.0], "normalization.std is [0.0], expected C positive numbers"),
    ("train_seconds_done", -1.0, "train_seconds_done is -1.0, expected a number >= 0"),
]


@pytest.mark.parametrize("dotted,value,says", BAD_VALUES, ids=[f"{k}={json.dumps(v)}"[:40] for k, v, _ in BAD_VALUES])
def test_manifest_with_a_wrong_value_is_refused(run_copy, dotted, value, says):
    edit_manifest(run_copy, lambda m: _set(m, dotted, value))
    message = refused(run_copy, lambda: evaluate_run(run_copy), f"manifest.json: {says}")
    assert message.startswith(str(run_copy / "manifest.json"))


def test_manifest_that_is_not_an_object_is_refused(run_copy):
    (run_copy / "manifest.json").write_text("[]")
    refused(run_copy, lambda: evaluate_run(run_copy), "the manifest is [], expected an object",
            DAMAGED_FIX)


def test_manifest_of_every_stage_of_a_run_is_read(run_copy):
    """A just-created manifest (no units, no files), a running and a finished one all pass."""
    manifest = RunDir(run_copy).manifest()
    created = {k: v for k, v in manifest.items() if k not in ("files", "train_seconds_done")}
    running = {**created, "units": {"block_02": manifest["units"]["block_02"]}}
    for stage in ({**created, "status": "running", "units": {}}, {**running, "status": "running"}, manifest):
        (run_copy / "manifest.json").write_text(json.dumps(stage))
        assert RunDir(run_copy).manifest() == stage


def test_a_backprop_manifest_is_checked_against_its_own_schema(trained_run, tmp_path):
    """A baseline's manifest (one unit "network", no schedule, a parameter count) passes its
    variant's schema and fails on DT units or a missing field."""
    dt = json.loads((trained_run[0] / "manifest.json").read_text())
    good = {**{k: v for k, v in dt.items() if k not in ("schedule", "files")}, "variant": "backprop_cnn", "T": 0,
            "parameters": 6042, "units": {"network": {**dt["units"]["head"], "file": "units/network.safetensors"}}}
    run = tmp_path / "bp"
    run.mkdir()
    for manifest, says in ((good, None),
                           ({**good, "units": dt["units"]}, "units is an object (keys block_01"),
                           ({k: v for k, v in good.items() if k != "parameters"}, "the manifest lacks 'parameters'"),
                           ({**good, "T": -1}, "T is -1, expected an integer in 0..1000"),
                           ({**dt, "units": good["units"]}, "expected units named block_01..block_T and head")):
        (run / "manifest.json").write_text(json.dumps(manifest))
        if says is None:
            assert RunDir(run).manifest() == manifest
        else:
            refused(run, RunDir(run).manifest, says, DAMAGED_FIX)


def test_writes_to_a_damaged_run_change_nothing(run_copy):
    """Training code reads the manifest before it writes: a damaged run is refused untouched."""
    edit_manifest(run_copy, lambda m: m["units"]["block_02"].pop("sha256"))
    run = RunDir(run_copy)
    tensors = {"model/w": torch.zeros(2)}
    refused(run_copy, lambda: run.save_unit("block_02", tensors, 1, False), "units.block_02 lacks 'sha256'")
    refused(run_copy, lambda: run.save_tensors("embedding", {"embedding": torch.zeros(2, 2)}), "lacks 'sha256'")
    refused(run_copy, lambda: run.update_manifest(status="finished"), "lacks 'sha256'")


CLI_CASES = {
    "key_removed": (lambda run: edit_manifest(run, lambda m: m["units"]["block_03"].pop("sha256")),
                    "units.block_03 lacks 'sha256'"),
    "passwd": (UNIT_FILE_CASES["dotdot_passwd"][0], NOT_INSIDE),
    "link_outside": (UNIT_FILE_CASES["link_outside"][0], "outside the run directory"),
    "alpha_bar_short": (lambda run: edit_manifest(run, lambda m: _set(m, "schedule.alpha_bar", [0.5])),
                        "schedule.alpha_bar is [0.5], expected T + 1 increasing numbers"),
}


@pytest.mark.parametrize("case", CLI_CASES)
@pytest.mark.parametrize("command", ["eval", "export"])
def test_cli_on_a_damaged_run_prints_one_line_and_exits_1(run_copy, capsys, case, command):
    damage, fragment = CLI_CASES[case]
    damage(run_copy)
    before = snapshot(run_copy.parent)
    out = run_copy.parent / "model.pt2"
    assert main([command, str(run_copy), *([str(out)] if command == "export" else [])]) == 1
    err = capsys.readouterr().err
    assert fragment in one_error_line(err) and "Traceback" not in err
    assert snapshot(run_copy.parent) == before


def test_a_commit_interrupted_by_a_kill_is_rolled_back_on_resume(run_copy):
    """A driver SIGKILLed between putting a unit's new checkpoint in place and recording it
    (CI met this window under load) leaves the file newer than the manifest: --resume puts
    the recorded one back from its .previous link, and removes a link left by a commit that
    did complete."""
    run = RunDir(run_copy)
    recorded = run.load_unit("block_01")
    path = run_copy / "units" / "block_01.safetensors"
    backup = path.with_name(".block_01.safetensors.previous")
    # The kill lands inside replacing(): the old file is linked, the new one renamed in place.
    os.link(path, backup)
    staged = run.stage_unit("block_01", {k: v + 1 if v.is_floating_point() else v for k, v in recorded.items()},
                            int(recorded["epochs_done"]) + 1)
    os.replace(run_copy / staged["staged"], path)
    with pytest.raises(CheckpointError, match="corrupt"):
        run.load_unit("block_01")
    assert run.undo_interrupted_commits() == ["units/block_01.safetensors"]
    assert not backup.exists()
    assert all(torch.equal(v, recorded[k]) for k, v in run.load_unit("block_01").items())
    # A link left after a complete commit: the recorded file stays, the link goes.
    os.link(path, backup)
    assert run.undo_interrupted_commits() == [] and not backup.exists()
    assert all(torch.equal(v, recorded[k]) for k, v in run.load_unit("block_01").items())
    # Through the CLI: the resume says what it put back, and finishes the run.
    os.link(path, backup)
    os.replace(run_copy / run.stage_unit("block_01", recorded, 99)["staged"], path)
    assert main(["train", "--resume", str(run_copy), "--no-progress"]) == 0
    assert not backup.exists()
    RunDir(run_copy).load_unit("block_01")
