"""Reading back what runs trained, for the tests that compare two runs' weights."""

from __future__ import annotations

from pathlib import Path

import torch

from noprop_dist.rundir import RunDir


def unit_tensors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every unit's checkpointed tensors (weights, optimizer state, ...), verified on load."""
    run = RunDir(run_dir)
    return {name: run.load_unit(name) for name in run.manifest()["units"]}


def max_weight_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between the two runs' floating-point weights."""
    ta, tb = unit_tensors(a), unit_tensors(b)
    assert ta.keys() == tb.keys()
    diff = 0.0
    for name in ta:
        for key in ta[name]:
            if key.startswith("model/") and ta[name][key].is_floating_point():
                diff = max(diff, float((ta[name][key] - tb[name][key]).abs().max()))
    return diff
