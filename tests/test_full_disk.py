"""A full disk (issue 19, item 2): when a checkpoint, the metrics file, the summary or an
export cannot be written, the command ends with one line naming the file, the run directory
and the exact resume command; the checkpoints written before stay whole (their checksums
verify) and ``--resume``, once there is space, ends with the weights of an uninterrupted run.

The disk fills at a chosen write: ``noprop_dist.rundir``'s ``os`` is replaced by a stand-in
whose ``fsync`` (the last step of every atomic file write) and ``write`` (the metrics lines)
raise ENOSPC from the k-th call on. One test fills a real 3 MB tmpfs instead, where this
machine lets a test mount one.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from noprop_dist import cli, rundir
from noprop_dist.rundir import RunDir
from run_weights import unit_tensors

TINY = ["--config", "tiny", "--cluster.backend=local", "--no-progress"]


class FullDiskOs:
    """``os`` whose ``fsync`` and ``write`` fail with ENOSPC from the ``fail_at``-th call on
    (counting both: one per file written, one per metrics line)."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls, self.failed = fail_at, 0, []

    def __getattr__(self, name):
        return getattr(os, name)

    def _count(self, fn, name, *args):
        self.calls += 1
        if self.calls >= self.fail_at:
            self.failed.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fn(*args)

    def fsync(self, fd):
        return self._count(os.fsync, "fsync", fd)

    def write(self, fd, data):
        return self._count(os.write, "write", fd, data)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = unit_tensors(a), unit_tensors(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].keys() == wb[name].keys(), name
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), (name, key)


def assert_recorded_files_verify(run_dir: Path) -> None:
    """Every file the manifest records reads back with its size and SHA-256 (load_* check them)."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    for name in manifest["units"]:
        run.load_unit(name)
    for name in manifest.get("files", {}):
        run.load_tensors(name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full_disk") / "whole"
    assert cli.main(["train", *TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("noprop-dist: error: could not write "), lines[0]
    return lines[0]


# Writes of the tiny run (T=4, 5 epochs): 1 config.toml, 2 the manifest; per epoch 5 metrics lines,
# then per unit its file and the manifest (epoch 1: writes 3-17, epoch 2: 18-32, ...); at the end
# 78 the embedding, 79-80 the manifest, 81 summary.json, 82 the last metrics line, 83 the
# manifest, 84 the plot. 3: the first metrics line; 24: the manifest just after block_01's
# epoch-2 file replaced its epoch-1 file (the old file must come back); 40: a unit file.
# The fast tier keeps one mid-run checkpoint; the other writes (each a train and a resume) are slow.
@pytest.mark.parametrize("fail_at", [pytest.param(3, marks=pytest.mark.slow), 24, pytest.param(40, marks=pytest.mark.slow),
                                     pytest.param(81, marks=pytest.mark.slow), pytest.param(82, marks=pytest.mark.slow),
                                     pytest.param(84, marks=pytest.mark.slow)])
def test_a_full_disk_ends_in_one_line_and_resume_gives_the_same_weights(tmp_path, monkeypatch, capsys,
                                                                          uninterrupted, fail_at):
    run_dir = tmp_path / "run"
    full = FullDiskOs(fail_at)
    monkeypatch.setattr(rundir, "os", full)
    code = cli.main(["train", *TINY, "--run-dir", str(run_dir)])
    monkeypatch.undo()
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and full.failed, (code, full.calls)
    assert "No space left on device" in line and f"in {run_dir} are intact" in line, line
    assert line.endswith(f"continue with: noprop-dist train --resume {run_dir} --cluster.backend=local"), line
    assert_recorded_files_verify(run_dir)
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("*.previous")), list(run_dir.rglob("*"))
    metrics = (run_dir / "metrics.jsonl").read_bytes() if (run_dir / "metrics.jsonl").exists() else b""
    assert not metrics or metrics.endswith(b"\n"), "a half-written metrics line was left behind"

    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert RunDir(run_dir).manifest()["status"] == "finished"
    assert_same_weights(run_dir, uninterrupted)


def test_the_resume_command_keeps_the_execution_options(tmp_path, monkeypatch, capsys):
    """Options --resume accepts (cluster, device, threads) are part of the printed command."""
    monkeypatch.setattr(rundir, "os", FullDiskOs(10))
    run_dir = tmp_path / "a run"
    assert cli.main(["train", *TINY, "--run-dir", str(run_dir), "--train.threads=1", "--train.lr=1e-3"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"noprop-dist train --resume '{run_dir}' --cluster.backend=local --train.threads=1"), line


def test_a_full_disk_during_export_is_one_line(tmp_path, monkeypatch, capsys, uninterrupted):
    """The export file failing to write: one line naming the file and the command to repeat; no
    partial file is left."""
    out = tmp_path / "model.pt2"
    monkeypatch.setattr(rundir, "os", FullDiskOs(1))
    assert cli.main(["export", str(uninterrupted), str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"noprop-dist: error: could not write {out} (No space left on device)"), line
    assert line.endswith(f"free space, then run again: noprop-dist export {uninterrupted} {out}"), line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs mounted at tmp_path/disk (skipped where this process may not mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", f"noprop-test-{uuid.uuid4().hex[:8]}",
                           str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_a_real_full_disk_then_resume(small_disk, capsys, uninterrupted):
    """The run directory on a 3 MB tmpfs, filled but for ~350 KB: the run stops in one line; once
    the filler is removed, --resume finishes with the weights of an uninterrupted run."""
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 350 * 1024))
    run_dir = small_disk / "run"
    assert cli.main(["train", *TINY, "--run-dir", str(run_dir)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and line.endswith(f"--resume {run_dir} --cluster.backend=local"), line
    assert_recorded_files_verify(run_dir)
    filler.unlink()
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert_same_weights(run_dir, uninterrupted)
    # The disk full again: an export (torch's own file writer would abort the process) is one line.
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 20 * 1024))
    assert cli.main(["export", str(run_dir), str(small_disk / "model.pt2")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "model.pt2 (No space left on device)" in line and line.endswith("model.pt2"), line
    assert not (small_disk / "model.pt2").exists()
