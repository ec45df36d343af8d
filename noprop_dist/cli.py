"""The ``noprop-dist`` command: parse, build, call. Work happens in the modules it calls.

    noprop-dist train [--config demo] [--run-dir DIR] [--address ADDR] [--variant=dt|ct|fm] [--key.sub=value ...]
    noprop-dist train --resume RUN_DIR [--cluster.key=value ...]
    noprop-dist eval RUN_DIR [--data FILE] [--json]
    noprop-dist export RUN_DIR OUT.pt2
    noprop-dist keys
"""

from __future__ import annotations

import argparse
import errno
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from noprop_dist import config as config_mod
from noprop_dist.data import load_file
from noprop_dist.errors import CheckpointError, ConfigError, NoPropError, RunStopped, write_failure
from noprop_dist.run.results import evaluate_run, export_run
from noprop_dist.run.signals import exit_status, signal_name, stop_on_signals
from noprop_dist.rundir import RunDir, load_run_config
from noprop_dist.trainers.ray.cluster import prepare_private_ray
from noprop_dist.variants.registry import find_trainer

# On --resume only these sections may change: how the run is executed, not what it computes.
RESUME_OVERRIDABLE = ("cluster.", "train.device", "train.threads", "train.log_every")


TOP_LEVEL_KEYS = ("variant",)


def parse_overrides(extra: list[str]) -> dict[str, Any]:
    """``--a.b=v`` or ``--a.b v`` pairs (and the top-level ``--variant``) into a dict;
    anything else is a ConfigError."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        name = arg.split("=", 1)[0][2:]
        if not arg.startswith("--") or ("." not in name and name not in TOP_LEVEL_KEYS):
            raise ConfigError(f"unrecognised argument {arg!r}; config overrides look like --train.lr=3e-4")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"{arg} needs a value, e.g. {arg}=VALUE")
            key, value = arg[2:], extra[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noprop-dist", description="Distributed NoProp training.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (--variant=dt|ct|fm|backprop|backprop_cnn; overrides: --section.key=value)")
    train.add_argument("--config", default="demo",
                       help=f"preset ({', '.join(config_mod.preset_names())}) or a .toml file")
    train.add_argument("--run-dir", help="run directory to create (default runs/<preset>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument("--address", help="Ray cluster address ('auto' or host:port); same as --cluster.address")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev = sub.add_parser("eval", help="evaluate a run's inference chain")
    ev.add_argument("run_dir")
    ev.add_argument("--data", help="a .npz/.parquet/.arrow file to evaluate on (default: the run's test split)")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ex = sub.add_parser("export", help="export the trained predictor as one torch.export file")
    ex.add_argument("run_dir")
    ex.add_argument("out")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists (never a run directory's own file)")
    sub.add_parser("keys", help="list every config key with its default")
    return parser


def train_config(preset: str, overrides: dict[str, Any], resume: str | None, run_dir: str | None,
                 check_new: bool = True) -> tuple[config_mod.Config, Path]:
    """The config and run directory of ``train`` (and of the torchrun launcher): a preset plus
    overrides for a new run, or the run's own saved config on ``--resume`` (where only how the
    run is executed may change)."""
    if resume:
        if not (Path(resume) / "manifest.json").exists():
            raise CheckpointError(f"{resume} is not a noprop_dist run directory (no manifest.json); "
                                  "pass the --run-dir of the run to continue")
        bad = [k for k in overrides if not k.startswith(RESUME_OVERRIDABLE)]
        if bad:
            raise ConfigError(f"--resume keeps the run's config; {bad[0]} cannot change (only cluster.* and train.device/threads)")
        cfg = config_mod.apply_overrides(load_run_config(RunDir(resume)), overrides, "the command line")
        config_mod.validate(cfg)
        return cfg, Path(resume)
    cfg = config_mod.resolve(preset, overrides)
    path = Path(run_dir or f"runs/{Path(preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if check_new:
        RunDir(path).refuse_existing()  # checked again on creation; this is before any work
    return cfg, path


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    overrides = parse_overrides(extra)
    if args.address is not None:
        overrides["cluster.address"] = args.address
    cfg, run_dir = train_config(args.config, overrides, args.resume, args.run_dir)
    trainer = find_trainer(cfg.cluster.backend, cfg.variant)
    prepare_private_ray(cfg.cluster)   # before the trainer's module imports Ray
    train = trainer.function()
    stop_on_signals()
    try:
        summary = train(cfg, run_dir, resume=bool(args.resume), show_progress=not args.no_progress)
    except KeyboardInterrupt as exc:   # SIGINT or SIGTERM: the trainer's cleanup has run
        if not (Path(run_dir) / "manifest.json").exists():
            raise RunStopped(f"stopped by {signal_name(exc)} before the run started; nothing was written to "
                          f"{run_dir}", exit_status(exc)) from None
        raise RunStopped(f"stopped by {signal_name(exc)}; the checkpoints of finished epochs are in {run_dir}; "
                      f"continue with: {resume_command(run_dir, overrides)}", exit_status(exc)) from None
    except OSError as exc:    # a full disk on any backend: the checkpoints written before are whole
        if (failed := write_failure(exc)) is None:
            raise
        raise NoPropError(f"{failed}; the last complete checkpoints in {run_dir} are intact: {write_fix(exc)}, "
                          f"then continue with: {resume_command(run_dir, overrides)}") from None
    print(f"run directory: {run_dir}")
    print(f"train seconds: {summary['train_seconds']:.1f}")
    if "chain_accuracy_noise" in summary:
        noise = "the Eq. 3 noise" if cfg.variant == "dt" else "the step noise"
        print(f"chain test accuracy: {summary['chain_accuracy_noise']:.4f} with {noise}, "
              f"{summary['chain_accuracy_no_noise']:.4f} without")
    if "steps" in summary:
        print(f"integration steps: {summary['steps']} ({summary['seconds_per_1000_images']:.2f} s per 1,000 test images)")
    print(f"test accuracy: {summary['test_accuracy']:.4f}")
    return 0


def resume_command(run_dir: str | Path, overrides: dict[str, Any]) -> str:
    """The command that continues the run in ``run_dir``, with the options of this one that
    ``--resume`` keeps (how the run is executed: cluster, device, threads)."""
    kept = [f"--{key}={value}" for key, value in overrides.items() if key.startswith(RESUME_OVERRIDABLE)]
    return shlex.join(["noprop-dist", "train", "--resume", str(run_dir), *kept])


def write_fix(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free space"
    return "make the directory writable"


def _export(args: argparse.Namespace) -> int:
    try:
        print(f"exported: {export_run(args.run_dir, args.out, force=args.force)}")
    except OSError as exc:
        if (failed := write_failure(exc)) is None:
            raise
        again = shlex.join(["noprop-dist", "export", str(args.run_dir), str(args.out)])
        raise NoPropError(f"{failed}; the run in {args.run_dir} is unchanged: {write_fix(exc)}, then run again: "
                          f"{again}") from None
    return 0


def _eval(args: argparse.Namespace) -> int:

    split = None
    if args.data:

        split = load_file(args.data, load_run_config(RunDir(args.run_dir)).data.layout)  # as the run read its data
    scores = evaluate_run(args.run_dir, split)
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"examples: {scores['examples']}")
        for key in ("chain_accuracy_noise", "chain_accuracy_no_noise", "nearest_accuracy_no_noise",
                    "nearest_accuracy", "steps"):
            if key in scores:
                print(f"{key}: {scores[key]:.4f}" if isinstance(scores[key], float) else f"{key}: {scores[key]}")
        for block, acc in scores.get("block_alone_accuracy", {}).items():
            print(f"{block} alone on fresh noise: {acc:.4f}")
        if scores["eval_forward_batch"] < scores["eval_batch_size"]:
            size = scores["eval_forward_batch"]
            print(f"forward passes of {size} example{'s' if size != 1 else ''}: eval.batch_size="
                  f"{scores['eval_batch_size']} does not fit this machine's free memory (the scores do not depend "
                  "on the pass size)")
        print(f"test accuracy: {scores['test_accuracy']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command != "train" and extra:
            raise ConfigError(f"unrecognised arguments for {args.command}: {' '.join(extra)}")
        if args.command == "train":
            return _train(args, extra)
        if args.command == "eval":
            return _eval(args)
        if args.command == "export":
            return _export(args)
        print("\n".join(config_mod.describe_keys()))
        return 0
    except NoPropError as exc:
        print(f"noprop-dist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:   # outside a run (eval, export, set-up): nothing to resume
        print(f"noprop-dist: stopped by {signal_name(exc)}", file=sys.stderr)
        return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
