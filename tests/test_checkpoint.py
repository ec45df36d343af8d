"""Tests of run directories, checkpoints, the summary and the export
(noprop_dist.checkpoint, noprop_dist.results).

All tests share the session's trained tiny run; those that damage a run work on a copy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch

from noprop_dist import checkpoint
from noprop_dist.checkpoint import SCHEMA_VERSION, RunDir, atomic_write, sha256
from noprop_dist.config import from_dict, to_toml
from noprop_dist.data import normalize
from noprop_dist.errors import CheckpointError
from noprop_dist.inference import RawImageChain, draw_noise, predict
from noprop_dist.local import train_local
from noprop_dist.dt import load_chain
from noprop_dist.results import evaluate_run, export_run

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
        "from noprop_dist.local import train_local\n"
        f"cfg = resolve('tiny', {{'data.cache_dir': {data_cache!r}, 'train.epochs': '1',"
        " 'train.head_passes': '1'})\n"
        f"train_local(cfg, {str(tmp_path / 'run')!r}, show_progress=False)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["versions"]["ray"]
