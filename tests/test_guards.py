"""Fast guards of the architecture's boundaries (issue 15, item 6).

Only the Ray trainer (the modules inside ``noprop_dist.trainers.ray``: the coordinator and
what it is made of) and DDP on Ray Train (``noprop_dist.trainers.ddp``) may import Ray: the
core, the networks, the variants, the unit loop, the run lifecycle, the command line, the
in-process trainer and the ``noprop_dist.trainers.ray`` package itself must work where Ray is
not installed, and an in-process run must not pay for importing it. The modules are
enumerated with ``pkgutil.walk_packages``, so a new module is covered without editing this
file. The run-time checks (a whole in-process run, lazy imports included) are the slow
``test_a_local_run_does_not_import_ray`` (test_checkpoint.py) and
``test_core_and_a_local_backprop_run_import_neither_ray_nor_open_a_process_group``
(test_backprop.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

# The only modules allowed to import Ray (at import time or later): DDP on Ray Train, and
# every module inside the Ray trainer's package (not the package's __init__).
RAY_TRAINER = "noprop_dist.trainers.ray"
RAY_MODULES = ("noprop_dist.trainers.ddp", "noprop_dist.trainers.ray.coordinator")


def may_import_ray(name: str) -> bool:
    return name in RAY_MODULES or name.startswith(RAY_TRAINER + ".")


# Must be among the enumerated modules (the folders each with modules of their own): a walk
# that silently found less would guard nothing.
PACKAGES = ("core", "nets", "variants", "training", "run", "trainers", "trainers.ray")
MODULES = ("cli", "config", "data", "trainers.local")

# Runs in a fresh interpreter: nothing imported by pytest or another test can hide an import.
# cli and config come first (the command line's start-up cost: no matplotlib, no Ray), then
# every other module in walk order; the first module after whose import Ray appears is named.
CHILD = r"""
import importlib, json, pkgutil, sys

def fail(name):
    raise ImportError(f"cannot walk {name}")

import noprop_dist
names = sorted(m.name for m in pkgutil.walk_packages(noprop_dist.__path__, "noprop_dist.", onerror=fail))
skip = set(sys.argv[1:])
prefixes = tuple(a for a in skip if a.endswith("."))
ray_by = "a package __init__ (walking the packages)" if "ray" in sys.modules else None
importlib.import_module("noprop_dist.cli")
importlib.import_module("noprop_dist.config")
after_cli = sorted(m for m in ("ray", "matplotlib") if m in sys.modules)
imported = []
for name in names:
    if name in skip or name.startswith(prefixes):
        continue
    importlib.import_module(name)
    imported.append(name)
    if ray_by is None and "ray" in sys.modules:
        ray_by = name
print(json.dumps({"names": names, "imported": imported, "after_cli": after_cli, "ray_by": ray_by,
                  "ray": "ray" in sys.modules}))
"""


def test_nothing_but_the_ray_trainers_imports_ray():
    """Every module of the package but the Ray trainer's own and the DDP trainer, imported in a
    fresh process, leaves Ray unimported; noprop_dist.cli and noprop_dist.config import
    neither Ray nor matplotlib."""
    proc = subprocess.run([sys.executable, "-c", CHILD, RAY_TRAINER + ".", *RAY_MODULES],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    names = set(seen["names"])
    for package in PACKAGES:
        inside = [n for n in names if n.startswith(f"noprop_dist.{package}.")]
        assert f"noprop_dist.{package}" in names and inside, f"the walk found no modules in noprop_dist.{package}"
    assert {f"noprop_dist.{m}" for m in MODULES} <= names, sorted(names)
    assert set(RAY_MODULES) <= names, "an allowed Ray module was renamed: update RAY_MODULES"
    assert set(seen["imported"]) == {n for n in names if not may_import_ray(n)}
    assert RAY_TRAINER in seen["imported"] and "noprop_dist.trainers.local" in seen["imported"]
    assert seen["after_cli"] == [], f"importing noprop_dist.cli and noprop_dist.config imported {seen['after_cli']}"
    assert seen["ray_by"] is None and not seen["ray"], f"importing {seen['ray_by']} imported ray"
