"""What the benchmark scripts share: their command-line options, training or reusing a run
directory, reading a finished run, and writing and formatting their results.

Run a script from the repository root (``python benchmarks/X.py``): its own folder is then on
``sys.path``, so it imports this module as ``common``. Nothing here imports torch, Ray or
matplotlib at module level (``cost_model.py`` must stay free of them); the package is imported
inside the functions that use it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------
def add_smoke(parser: argparse.ArgumentParser, help: str) -> None:
    """The one smoke flag of every script: ``--smoke`` (``--smoke-test`` is the same)."""
    parser.add_argument("--smoke", "--smoke-test", dest="smoke", action="store_true", help=help)


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """``--override KEY=VALUE ...``; :func:`parse_args` also takes ``--section.key=value``."""
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.dropout=0.2 (also accepted: --model.dropout=0.2)")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed options, with ``args.overrides``: the config overrides given as
    ``--override KEY=VALUE`` pairs and as ``--section.key=value`` arguments, read by the
    package's own parser (:func:`noprop_dist.cli.parse_overrides`)."""
    from noprop_dist.cli import parse_overrides
    from noprop_dist.errors import ConfigError

    args, extra = parser.parse_known_args(argv)
    pairs = getattr(args, "override", None) or []
    bare = [p for p in pairs if "=" not in p]
    if bare:
        parser.error(f"--override {bare[0]}: expected KEY=VALUE, e.g. model.dropout=0.2")
    try:
        args.overrides = parse_overrides([f"--{p.removeprefix('--')}" for p in pairs] + extra)
    except ConfigError as exc:
        parser.error(str(exc))
    return args


def ray_environment(address: str = "") -> None:
    """Close the private local Ray a script is about to start exactly as ``noprop-dist train``
    does (loopback only, a fresh token; :func:`noprop_dist.trainers.ray.cluster.prepare_private_ray`):
    call it before anything imports Ray. Nothing happens when ``address`` joins a cluster; an
    exported ``RAY_AUTH_MODE`` is kept, as the command keeps it."""
    from noprop_dist.config import ClusterConfig
    from noprop_dist.trainers.ray.cluster import prepare_private_ray

    prepare_private_ray(ClusterConfig(backend="ray", address=address))


SMOKE_NOTE = ("note: --smoke trains the tiny preset for seconds, too little work for its speed-ups, parallel "
              "efficiency or cost-model verdicts to mean anything (start-up and scheduling dominate); they show "
              "that the script runs. Run without --smoke for figures to read.")
"""Printed (and written into the results) by every benchmark whose ``--smoke`` output holds such figures."""


def default_out(name: str) -> Path:
    """Where a script writes ``name`` without ``--out``: a fresh temporary directory, never the
    checkout (the caller prints the path)."""
    return Path(tempfile.mkdtemp(prefix="noprop-bench-")) / name


# ---------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------
Trainer = Callable[[Any, Path, bool], tuple]
"""``trainer(cfg, run_dir, resume) -> (summary, wall seconds)``, e.g. :func:`train`."""


def train(cfg, run_dir: str | Path, resume: bool = False) -> tuple[dict[str, Any], float]:
    """Train ``cfg`` into ``run_dir`` with the trainer the registry gives its backend and
    variant, as ``noprop-dist train`` does; returns the summary and the wall seconds (the
    trainer's import included)."""
    from noprop_dist.trainers.ray.cluster import prepare_private_ray

    from noprop_dist.variants.registry import find_trainer

    start = time.perf_counter()
    trainer = find_trainer(cfg.cluster.backend, cfg.variant)
    prepare_private_ray(cfg.cluster)   # before the trainer's module imports Ray
    summary = trainer.function()(cfg, Path(run_dir), resume=resume, show_progress=False)
    return summary, time.perf_counter() - start


def run_together(target: Callable, args: list[tuple], timeout: float = 600.0) -> list:
    """``target(*a, barrier, queue)`` in one spawned process per ``a`` of ``args``, all at once:
    each process warms up, waits at ``barrier`` so that the timed parts overlap, and puts its
    result on ``queue``. Returns the results in the order they arrived."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(len(args))
    procs = [ctx.Process(target=target, args=(*a, barrier, queue)) for a in args]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=timeout) for _ in procs]
    for proc in procs:
        proc.join()
    return results


def fresh_dir(path: str | Path) -> Path:
    """``path``, removed first if it exists (a run that must be trained anew)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    return path


def run_or_reuse(cfg, run_dir: str | Path, replace: bool = False,
                 trainer: Trainer = train) -> tuple[dict[str, Any], float | None]:
    """The summary of a finished run of ``cfg`` in ``run_dir``, and the seconds it took to
    train here: None when the run was already there (read, not retrained).

    A run of another config in ``run_dir`` is refused (SystemExit), an unfinished one of
    ``cfg`` is resumed; with ``replace`` either is removed and trained again."""
    from noprop_dist.run.lifecycle import finished_summary
    from noprop_dist.rundir import MANIFEST, RunDir, load_run_config

    run_dir = Path(run_dir)
    if (run_dir / MANIFEST).exists():
        run = RunDir(run_dir)
        same = load_run_config(run) == cfg
        if same and (done := finished_summary(run)) is not None:
            return done, None
        if not same and not replace:
            raise SystemExit(f"{run_dir} holds a run of another config (trained with other options?); "
                             "pass the same options, remove it, or use another --out")
    if replace:
        fresh_dir(run_dir)
    return trainer(cfg, run_dir, run_dir.exists())


@dataclass
class FinishedRun:
    """A finished run directory, read through :class:`noprop_dist.rundir.RunDir`."""

    path: Path
    summary: dict[str, Any]
    manifest: dict[str, Any]
    metrics: list[dict[str, Any]]

    def events(self, event: str) -> list[dict[str, Any]]:
        """The metrics records of one kind (``unit_epoch``, ``eval``, ``communication``, ...)."""
        return [r for r in self.metrics if r.get("event") == event]

    @property
    def config(self):
        """The run's resolved config (its config.toml)."""
        from noprop_dist.rundir import RunDir, load_run_config

        return load_run_config(RunDir(self.path))


def read_run(run_dir: str | Path) -> FinishedRun:
    """A finished run's summary, manifest (checked) and metrics; a CheckpointError (the
    package's) if ``run_dir`` holds no run or one that has not finished."""
    from noprop_dist.errors import CheckpointError
    from noprop_dist.run.lifecycle import finished_summary
    from noprop_dist.rundir import RunDir

    run = RunDir(run_dir)
    summary = finished_summary(run)
    if summary is None:
        raise CheckpointError(f"{run.path} holds no finished run (no summary.json): train it to the end first")
    return FinishedRun(run.path, summary, run.manifest(), run.read_metrics())


# ---------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------
def fmt(value: Any, spec: str = ".3f") -> str:
    """A number of a results table: ``-`` for None or NaN; anything not a number as is."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return [row_line(head), "|" + "---|" * len(head)] + [row_line(r) for r in rows]


def row_line(cells: list[Any]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def read_json(path: str | Path, default: Any = None) -> Any:
    """A results file written earlier, or ``default`` when there is none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def report(out: str | Path, results: Any, lines: list[str], name: str, smoke: bool) -> None:
    """Write ``OUT/<name>.json`` and the Markdown of ``lines`` (with the smoke note when
    ``smoke``) and print the Markdown and where both went."""
    markdown = "\n".join(lines + (["", SMOKE_NOTE] if smoke else [])) + "\n"
    write_results(out, results, markdown, name=name)
    print(markdown)
    print(f"[{name}] wrote {Path(out) / name}.json and .md")


def write_results(out: str | Path, results: Any, markdown: str, name: str = "results") -> tuple[Path, Path]:
    """``OUT/<name>.json`` and ``OUT/<name>.md`` (rewritten whole, e.g. after every run)."""
    out = Path(out)
    md = out / f"{name}.md"
    json_path = write_json(out / f"{name}.json", results)
    md.write_text(markdown)
    return json_path, md
