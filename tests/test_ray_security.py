"""The private local Ray is closed to the network (issue 7, item 14).

Ray reads ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it
is imported, and this test process imports Ray with authentication off for the other test
modules, so the private Ray runs in a child process that does what ``noprop-dist train`` does
(``prepare_private_ray`` before ``import ray``, then ``connect``) and waits until told to exit.
Clients are other child processes.

What a run showed (Ray 2.60, Linux): every listening socket of the private Ray is on loopback:
the GCS, the raylet's two gRPC servers (node manager, object manager), the driver's and each
worker's core-worker server, the dashboard agent (gRPC, HTTP on 52365, metrics export), the
runtime-env agent, and the Prometheus servers of the autoscaler monitor (44217) and of the
headless dashboard (44227). Without the loopback setting the same servers listen on all
interfaces (``::``/``0.0.0.0``) or on the node's address.

A DDP run (Ray Train) on the private Ray: Ray Train's own rendezvous, a torch.distributed
TCPStore on rank 0, listened on ``::``; its workers now meet through a file in a private
directory and gloo binds to loopback, so a DDP run listens on loopback only too
(:func:`test_a_ddp_run_on_a_private_ray_listens_on_loopback_only`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from noprop_dist.rundir import RunDir
from noprop_dist.trainers.ray.cluster import (AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH, LOOPBACK_NODE, is_loopback,
                                              private_ray_env)
from proc_sockets import listening_sockets, process_tree

REPO = Path(__file__).resolve().parents[1]
RAY_VARS = (AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH, LOOPBACK_NODE, "RAY_ADDRESS")

SERVER = r"""
import json, os, sys
from noprop_dist.config import ClusterConfig
from noprop_dist.trainers.ray.cluster import connect, prepare_private_ray
cluster = ClusterConfig(local_cpus=1, local_gpus=0)
names = prepare_private_ray(cluster)
connect(cluster)
import ray
node = ray._private.worker._global_node   # private API, only to find the session directory
print(json.dumps({"set": names, "mode": os.environ["RAY_AUTH_MODE"], "token": os.environ["RAY_AUTH_TOKEN"],
                  "gcs": ray.get_runtime_context().gcs_address,
                  "session_dir": node.get_session_dir_path()}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""

CLIENT = r"""
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
except Exception as exc:
    print("refused:", type(exc).__name__, exc)
    sys.exit(3)
print("connected, CPUs:", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any Ray address or authentication setting (the suite runs
    with RAY_AUTH_MODE=disabled), HOME in ``home`` so no ~/.ray/auth_token is found or
    written outside it."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    return {**env, "HOME": str(home), **extra}


@pytest.fixture(scope="module")
def private_ray(tmp_path_factory):
    """A private Ray as ``noprop-dist train`` starts it, in a child process: (process, what it
    printed: the variables set, auth mode, token, GCS address, session dir), HOME."""
    home = tmp_path_factory.mktemp("home")
    proc = subprocess.Popen([sys.executable, "-c", SERVER], env=clean_env(home), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the private Ray did not start: {proc.stderr.read()[-2000:]}")
        yield proc, json.loads(line), home
    finally:
        try:
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(timeout=30)


def client(gcs: str, home: Path, **auth: str) -> subprocess.Popen:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: else the client turns 127.0.0.1 into the node's
    # address, where nothing listens.
    env = clean_env(home, **{LOOPBACK_NODE: "0"}, **auth)
    return subprocess.Popen([sys.executable, "-c", CLIENT, gcs], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_private_ray_refuses_a_client_without_its_token(private_ray):
    """Token authentication is on with a fresh 64-hex-digit token: a client with it connects
    (so the refusals below are not a wrong address), one without a token, or with another
    token, is refused by the GCS (InvalidAuthToken)."""
    _, info, home = private_ray
    assert sorted(info["set"]) == [AUTH_MODE, AUTH_TOKEN, LOOPBACK_NODE]
    assert info["mode"] == "token" and len(info["token"]) == 64
    right = client(info["gcs"], home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=info["token"])
    out, err = right.communicate(timeout=120)
    assert right.returncode == 0 and "connected" in out, (out, err[-2000:])
    refused = {"no token": client(info["gcs"], home),
               "another token": client(info["gcs"], home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)}
    for case, proc in refused.items():   # both wait out Ray's retries (about 20 s) at once
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 3 and out.startswith("refused:"), (case, out, err[-2000:])
        assert "InvalidAuthToken" in err, (case, err[-2000:])


@pytest.mark.slow
def test_private_ray_listens_on_loopback_only(private_ray):
    """Every TCP socket the private Ray's processes listen on is a loopback address, and none
    of their ports answers on this machine's network address."""
    proc, info, _ = private_ray
    sockets = listening_sockets(proc.pid)
    print("\n".join(f"{address:>18} {port:>5}  {name}" for address, port, name in sockets))
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert int(info["gcs"].rpartition(":")[2]) in {port for _, port, _ in sockets}
    assert is_loopback(info["gcs"].rpartition(":")[0])
    assert all(is_loopback(address) for address, _, _ in sockets), [s for s in sockets if not is_loopback(s[0])]
    node_ip = network_address()
    if node_ip is None:
        pytest.skip("this machine has no network address besides loopback")
    for _, port, name in sockets:
        with pytest.raises(OSError):
            socket.create_connection((node_ip, port), timeout=2).close()


DDP_RUN = r"""
import sys
from noprop_dist.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_ddp_run_on_a_private_ray_listens_on_loopback_only(tmp_path, data_cache):
    """`noprop-dist train --cluster.backend=ddp` as a user runs it (token auth, loopback): every TCP
    socket its processes listen on while it trains, the DDP workers' process group included, is
    a loopback address. Also: its stderr (not a terminal) gets one plain line per epoch."""
    run_dir = tmp_path / "run"
    args = ["train", "--config", "tiny", "--variant=backprop", "--cluster.backend=ddp", "--cluster.workers=2",
            "--cluster.local_cpus=2", "--train.epochs=6", f"--data.cache_dir={data_cache}", "--run-dir", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-c", DDP_RUN, *args], env=clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: dict[tuple[str, int, str], set[int]] = {}     # socket -> the run's unit-epochs done when seen
    try:
        while proc.poll() is None:
            epochs = sum(r.get("event") == "unit_epoch" for r in RunDir(run_dir).read_metrics())
            for found in listening_sockets(proc.pid):
                seen.setdefault(found, set()).add(epochs)
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    print("\n".join(f"{address:>18} {port:>5}  {name} (seen after unit-epochs {sorted(epochs)})"
                    for (address, port, name), epochs in sorted(seen.items(), key=lambda s: s[0][2])))
    assert proc.returncode == 0, err[-2000:]
    workers = {s for s in seen if "RayTrainWorker" in s[2]}
    assert workers and {"gcs_server", "raylet"} <= {name for _, _, name in seen}, seen
    # Sampled while the workers trained (their process group open: the run has 6 unit-epochs).
    assert any(epochs & {1, 2, 3, 4, 5} for s, epochs in seen.items() if s in workers), seen
    assert all(is_loopback(address) for address, _, _ in seen), [s for s in seen if not is_loopback(s[0])]
    lines = [line for line in err.splitlines() if line.startswith("  network epoch ")]
    assert [line.split()[2] for line in lines] == [f"{e}/6" for e in range(1, 7)], err[-2000:]
    assert "samples/s" in lines[0] and "\r" not in err and "\x1b[" not in err


def network_address() -> str | None:
    """This machine's address on the route out (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if is_loopback(address) else address


@pytest.mark.slow
def test_private_ray_token_is_in_no_file_and_no_command_line(private_ray):
    """The token is in no file of the Ray session directory (logs included) nor under ~/.ray
    (Ray wrote no auth_token there), in no process's command line (readable by every user),
    only in the environments of the Ray processes, which only their owner may read."""
    proc, info, home = private_ray
    token = info["token"].encode()
    files = [p for p in Path(info["session_dir"]).rglob("*") if p.is_file() and not p.is_symlink()]
    assert files, info["session_dir"]
    assert not [p for p in files if token in p.read_bytes()]
    assert not (home / ".ray" / "auth_token").exists()
    pids = process_tree(proc.pid)
    assert len(pids) > 3
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ")
            mode = environ.stat().st_mode
        except OSError:
            continue   # ended meanwhile
        assert token not in cmdline, pid
        assert mode & 0o077 == 0, (pid, oct(mode))


def test_private_ray_env_rules():
    """What prepare_private_ray adds: everything before Ray is imported; the user's
    RAY_AUTH_MODE, token and loopback setting are kept; after Ray is imported only a token,
    and only while RAY_AUTH_MODE is unset (Ray keeps the mode it read on import)."""
    fresh = private_ray_env({}, ray_imported=False)
    assert fresh[AUTH_MODE] == "token" and fresh[LOOPBACK_NODE] == "0" and len(fresh[AUTH_TOKEN]) == 64
    assert private_ray_env({}, ray_imported=False)[AUTH_TOKEN] != fresh[AUTH_TOKEN]
    assert private_ray_env({AUTH_MODE: "disabled"}, ray_imported=False) == {LOOPBACK_NODE: "0"}
    assert private_ray_env({AUTH_MODE: "token", AUTH_TOKEN: "x"}, ray_imported=False) == {LOOPBACK_NODE: "0"}
    assert private_ray_env({AUTH_MODE: "token", AUTH_TOKEN_PATH: "/p", LOOPBACK_NODE: "1"}, ray_imported=False) == {}
    assert set(private_ray_env({AUTH_MODE: "token"}, ray_imported=False)) == {AUTH_TOKEN, LOOPBACK_NODE}
    assert set(private_ray_env({}, ray_imported=True)) == {AUTH_TOKEN}
    assert private_ray_env({AUTH_MODE: "disabled"}, ray_imported=True) == {}


def test_cli_prepares_a_private_ray_before_ray_is_imported(tmp_path):
    """`noprop-dist train` sets the variables before the trainer's module (and so Ray) is
    imported, only for a Ray backend without --address, and keeps an exported RAY_AUTH_MODE."""
    code = (
        "import json, os, sys\n"
        "import noprop_dist.cli as cli\n"
        "seen = {}\n"
        "def train(cfg, run_dir, resume=False, show_progress=True):\n"
        "    return {'train_seconds': 0.0, 'test_accuracy': 0.0}\n"
        "class Trainer:\n"
        "    def function(self):\n"
        f"        seen.update({{k: os.environ.get(k) for k in {list(RAY_VARS[:4])!r}}}, ray='ray' in sys.modules)\n"
        "        return train\n"
        "cli.find_trainer = lambda backend, variant: Trainer()\n"
        "saved = dict(os.environ)\n"
        "for i, args in enumerate(json.loads(sys.argv[1])):\n"
        "    os.environ.clear(); os.environ.update({**saved, **args.pop(0)})\n"
        f"    run_dir = f'{tmp_path}/r{{i}}'\n"
        "    assert cli.main(['train', '--config', 'tiny', '--run-dir', run_dir, '--no-progress', *args]) == 0\n"
        "    print(json.dumps(seen))\n")
    cases = [({}, ["--cluster.backend=ray"]),
             ({AUTH_MODE: "disabled"}, ["--cluster.backend=ddp", "--variant=backprop"]),
             ({}, ["--cluster.backend=ray", "--address=10.0.0.1:6379"]),
             ({}, ["--cluster.backend=local"])]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([[env, *args] for env, args in cases])],
                          env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(seen) == 4 and not any(s["ray"] for s in seen)
    assert seen[0][AUTH_MODE] == "token" and len(seen[0][AUTH_TOKEN]) == 64 and seen[0][LOOPBACK_NODE] == "0"
    assert seen[1][AUTH_MODE] == "disabled" and seen[1][AUTH_TOKEN] is None and seen[1][LOOPBACK_NODE] == "0"
    for s in seen[2:]:
        assert s[AUTH_MODE] is None and s[AUTH_TOKEN] is None and s[LOOPBACK_NODE] is None


# ---- the scripts of benchmarks/ and launch/ (issue 19, item 7) -------------------------------
SCRIPT_DIRS = ("benchmarks", "launch")
OPEN_RAY_ALLOWED = {
    "launch/test.sh": "runs the test suite, whose own Ray instances run without authentication; the closed "
                      "private Ray is checked above in child processes with a clean environment",
}
PREPARES = {"ray_environment", "prepare_private_ray"}
RAY_MODULES = ("ray", "noprop_dist.trainers.ray.coordinator", "noprop_dist.trainers.ddp")
SETS_AUTH_OFF = {   # os.environ["RAY_AUTH_MODE"] = "disabled", setdefault("RAY_AUTH_MODE", "disabled"); export ...=
    ".py": re.compile(r"""RAY_AUTH_MODE['"]\s*\]?\s*[,=:]\s*['"]disabled"""),
    ".sh": re.compile(r"""(^|[;&|(]|\bexport|\benv)\s*RAY_AUTH_MODE=["']?(\$\{RAY_AUTH_MODE:-)?disabled"""),
    ".yaml": re.compile(r"""(^|[;&|(-]|\bexport|\benv)\s*RAY_AUTH_MODE=["']?disabled"""),
}


def code_lines(path: Path) -> list[str]:
    """The lines of a script that run: no comments, no here-document bodies (help texts)."""
    lines, end = [], None
    for line in path.read_text().splitlines():
        if end is not None:
            end = None if line.strip() == end else end
            continue
        if line.lstrip().startswith("#"):
            continue
        if path.suffix == ".sh" and (m := re.search(r"<<-?\s*['\"]?(\w+)", line)):
            end = m.group(1)
        # Messages do not run: a quoted string is blanked unless it is RAY_AUTH_MODE's value.
        lines.append(re.sub(r'(?<!RAY_AUTH_MODE=)"[^"]*"', '""', line) if path.suffix == ".sh" else line)
    return lines


def script_files() -> list[Path]:
    return sorted(p for d in SCRIPT_DIRS for p in (REPO / d).iterdir()
                  if p.suffix in (".py", ".sh", ".yaml") and p.is_file())


def ray_starts_before_preparation(tree: ast.AST) -> list[str]:
    """In each scope (the module, each function), the statements that import Ray (or a trainer
    module that does) or start it (``connect``, ``ray.init``) before a call of
    ``ray_environment``/``prepare_private_ray`` in that scope."""
    found = []
    for scope in [tree, *[n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]]:
        prepared = None
        for node in sorted(_own_nodes(scope), key=lambda n: (n.lineno, n.col_offset)):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in PREPARES and prepared is None:
                    prepared = node.lineno
                if (name == "connect" or ast.unparse(node.func) == "ray.init") and prepared is None:
                    found.append(f"line {node.lineno}: {ast.unparse(node.func)}()")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if prepared is None and any(n == m or n.startswith(m + ".") for n in names for m in RAY_MODULES):
                found.append(f"line {node.lineno}: import {names[0]}")
    return found


def _own_nodes(scope: ast.AST) -> list[ast.AST]:
    """The nodes of ``scope`` outside the functions defined in it."""
    out, todo = [], list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return [n for n in out if hasattr(n, "lineno")]


def test_no_script_opens_ray_or_starts_it_before_closing_it():
    """No script in benchmarks/ or launch/ sets RAY_AUTH_MODE=disabled (outside comments), and no
    Python script imports or starts Ray before it prepared the private Ray as the CLI does."""
    problems = []
    for path in script_files():
        rel = str(path.relative_to(REPO))
        if rel not in OPEN_RAY_ALLOWED:
            problems += [f"{rel}: sets {m.group(0).strip()}" for line in code_lines(path)
                         if (m := SETS_AUTH_OFF[path.suffix].search(line))]
        if path.suffix == ".py":
            problems += [f"{rel}: {p} before the private Ray is prepared"
                         for p in ray_starts_before_preparation(ast.parse(path.read_text()))]
    assert not problems, "\n".join(problems)
    # The checks can fail: what issue 19 found in benchmarks/scaling.py, and its shell form.
    bad = 'import os\nos.environ.setdefault("RAY_AUTH_MODE", "disabled")\nimport ray\ndef main():\n    connect(c)\n'
    assert SETS_AUTH_OFF[".py"].search(bad) and len(ray_starts_before_preparation(ast.parse(bad))) == 2
    assert SETS_AUTH_OFF[".sh"].search('export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"')
    assert not SETS_AUTH_OFF[".sh"].search('[ "$RAY_AUTH_MODE" = disabled ] || die 2 "RAY_AUTH_MODE=disabled only"')


def test_benchmarks_prepare_the_same_private_ray_as_the_cli(tmp_path):
    """benchmarks/common.ray_environment, called by every benchmark that starts a private Ray,
    sets what `noprop-dist train` sets (token auth with a fresh token, loopback) without
    importing Ray, and nothing for a cluster given by address."""
    code = ("import json, os, sys\n"
            f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
            "import common\n"
            "common.ray_environment(sys.argv[1])\n"
            f"print(json.dumps({{**{{k: os.environ.get(k) for k in {list(RAY_VARS[:4])!r}}}, 'ray': 'ray' in sys.modules}}))\n")
    seen = []
    for address in ("", "auto"):
        proc = subprocess.run([sys.executable, "-c", code, address], env=clean_env(tmp_path), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen.append(json.loads(proc.stdout.splitlines()[-1]))
    private, cluster = seen
    assert private[AUTH_MODE] == "token" and len(private[AUTH_TOKEN]) == 64 and private[LOOPBACK_NODE] == "0"
    assert not private["ray"] and not cluster["ray"]
    assert cluster[AUTH_MODE] is None and cluster[AUTH_TOKEN] is None and cluster[LOOPBACK_NODE] is None
