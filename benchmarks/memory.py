"""Peak training memory of one block worker, per block preset.

Trains one block for one epoch on a small slice of the data and reports what one worker
holds: parameters + gradients + AdamW state + the activations autograd saves for backward
(counted with saved-tensor hooks), and on a GPU ``torch.cuda.max_memory_allocated``.
The paper reports 0.49 GB (MNIST) for a whole NoProp-DT run on one GPU; here it is per block.

    python benchmarks/memory.py                 # MNIST subset shapes, batch 128, all presets
    python benchmarks/memory.py --smoke         # digits, seconds (--smoke-test: the same)
    python benchmarks/memory.py --override model.dropout=0.2

Writes memory.json into a fresh temporary directory and prints where (or to --out FILE).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from common import add_overrides, add_smoke, default_out, parse_args, write_json
from noprop_dist import config
from noprop_dist.data import ArraySplit, load_dataset
from noprop_dist.training.runner import UnitRunner
from noprop_dist.variants.base import make_setup, resolve_device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--blocks", nargs="+", default=["paper", "small", "tiny"])
    parser.add_argument("--batch-size", type=int, default=128)
    add_smoke(parser, "tiny preset: seconds")
    add_overrides(parser)
    parser.add_argument("--out", help="results file (default: memory.json in a new temporary directory)")
    args = parse_args(parser)
    preset = "tiny" if args.smoke else args.config
    rows = []
    for block in args.blocks:
        cfg = config.resolve(preset, {"model.block": block, "train.batch_size": args.batch_size, **args.overrides})
        full = load_dataset(cfg.data)
        # Two batches drawn at random (the MNIST subset is stored by class: its first rows share one).
        pick = np.sort(np.random.default_rng(0).permutation(len(full.train))[:2 * args.batch_size])
        data = dataclasses.replace(full, train=ArraySplit(np.asarray(full.train.x[pick]), np.asarray(full.train.y[pick])))
        setup = make_setup(cfg, data)
        device = resolve_device(cfg.train.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        first_block = next(u for u in setup.units if u.role == "block")
        runner = UnitRunner(first_block, setup, data.train, device)
        runner.run_epoch(1)
        params = sum(p.numel() for p in runner.module.parameters())
        row = {"block": block, "input_shape": list(data.input_shape), "batch_size": args.batch_size,
               "parameters": params, "peak_bytes": runner.peak_memory_bytes, "device": str(device)}
        if device.type == "cuda":
            row["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        rows.append(row)
    print(f"{'block':>6} {'input':>10} {'params':>10} {'peak MB / worker':>16}")
    for row in rows:
        print(f"{row['block']:>6} {'x'.join(map(str, row['input_shape'])):>10} {row['parameters']:>10,} "
              f"{row['peak_bytes'] / 2**20:>16.1f}")
    print(f"results: {write_json(args.out or default_out('memory.json'), rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
