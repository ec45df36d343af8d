"""Peak training memory of one block worker, per block preset.

Trains one block for one epoch on a small slice of the data and reports what one worker
holds: parameters + gradients + AdamW state + the activations autograd saves for backward
(counted with saved-tensor hooks), and on a GPU ``torch.cuda.max_memory_allocated``.
The paper reports 0.49 GB (MNIST) for a whole NoProp-DT run on one GPU; here it is per block.

    python benchmarks/memory.py                 # MNIST subset shapes, batch 128, all presets
    python benchmarks/memory.py --smoke-test    # digits, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from noprop_dist import config  # noqa: E402
from noprop_dist.data import ArraySplit, load_dataset  # noqa: E402
from noprop_dist.variants.dt import block as dt_block  # noqa: E402
from noprop_dist.variants.base import make_setup, resolve_device  # noqa: E402
from noprop_dist.training.runner import UnitRunner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--blocks", nargs="+", default=["paper", "small", "tiny"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.dropout=0.2 (the demo preset's value before issue 10)")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    preset = "tiny" if args.smoke_test else args.config
    rows = []
    with tempfile.TemporaryDirectory():
        for block in args.blocks:
            overrides = {"model.block": block, "train.batch_size": args.batch_size}
            cfg = config.resolve(preset, {**overrides, **dict(kv.split("=", 1) for kv in args.override)})
            full = load_dataset(cfg.data)
            # Two batches drawn at random (the MNIST subset is stored by class: its first rows share one).
            pick = np.sort(np.random.default_rng(0).permutation(len(full.train))[:2 * args.batch_size])
            data = dataclasses.replace(full, train=ArraySplit(np.asarray(full.train.x[pick]), np.asarray(full.train.y[pick])))
            setup = make_setup(cfg, data)
            device = resolve_device(cfg.train.device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runner = UnitRunner(dt_block(1), setup, data.train, device)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
