"""The launch scripts (issue 8): launch/cluster.sh (start/stop one Ray node), launch/submit.sh
(submit a training job, wait for the job agent, follow it, exit with its status) and the
cluster-launcher template launch/cluster.yaml.

The fast tests run the scripts against a stand-in `ray` (a shell script that records how it was
called and answers as Ray does) and a bare listening socket, so they check the scripts' own
logic without starting Ray. The slow test starts a real cluster on this machine: a head and two
worker nodes as separate `ray start` processes (through cluster.sh, token auth on), submits a
tiny training job through submit.sh and checks that its blocks ran on both worker nodes. Every
test stops only the processes it started, by PID; none runs `ray stop`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "cluster.sh"
SUBMIT = REPO / "launch" / "submit.sh"
YAML = REPO / "launch" / "cluster.yaml"
REAL_RAY = Path(sys.executable).with_name("ray")

FAKE_RAY = r"""#!/usr/bin/env bash
# Stand-in for `ray` in tests/test_launch.py: records its calls, answers as Ray 2.60 does.
d="$FAKE_RAY_DIR"
printf '%s\n' "$*" >> "$d/calls"
{
  echo "RAY_AUTH_MODE=${RAY_AUTH_MODE-<unset>}"
  echo "RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH-<unset>}"
  echo "RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:+<set>}"
} > "$d/env.$1"
case "$1 ${2:-}" in
  "start "*)
    echo "Local node IP: 127.0.0.1"
    echo "Ray runtime started."
    while true; do sleep 1; done ;;
  "job submit")
    n=$(( $(cat "$d/submits" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$d/submits"
    if [ "$n" -le "${FAKE_NO_AGENT:-0}" ]; then
      echo "Traceback (most recent call last):"
      echo "RuntimeError: Request failed with status code 500: No available agent to submit job, please try again later."
      exit 1
    fi
    if [ -n "${FAKE_SUBMIT_ERROR:-}" ]; then echo "$FAKE_SUBMIT_ERROR"; exit 1; fi
    id=""; prev=""
    for a in "$@"; do [ "$prev" = --submission-id ] && id="$a"; prev="$a"; done
    echo "Job '$id' submitted successfully"; exit 0 ;;
  "job logs")
    echo "fake: training log line"; [ -z "${FAKE_LOG:-}" ] || echo "$FAKE_LOG"; exit 0 ;;
  "job status")
    id="${@: -1}"
    case "${FAKE_STATUS:-SUCCEEDED}" in
      SUCCEEDED) echo "Job '$id' succeeded" ;;
      FAILED) echo "Job '$id' failed"; echo "Status message: Job entrypoint command failed with exit code 1" ;;
      STOPPED) echo "Job '$id' was stopped" ;;
    esac
    exit 0 ;;
esac
echo "fake ray: unexpected call: $*" >&2
exit 99
"""


# ---- helpers ----------------------------------------------------------------------------------
def base_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a script under test: no Ray address or auth settings of the caller's,
    HOME in the test's directory (so ~/.ray/auth_token is never the user's)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_BIN", "NOPROP_PYTHON", "FAKE_"))}
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env.update(extra)
    return env


def run(args: list, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listener():
    """A TCP port on loopback that accepts connections (what the scripts' reachability check
    needs), with nothing behind it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def fake_ray(tmp_path) -> Path:
    d = tmp_path / "fake"
    d.mkdir()
    ray = d / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    return d


def calls(fake: Path) -> list[str]:
    path = fake / "calls"
    return path.read_text().splitlines() if path.exists() else []


def token_file(path: Path, mode: int = 0o600, text: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text is not None else "%064x" % random.getrandbits(256))
    path.chmod(mode)
    return path


# ---- processes: what a test started, found by session, ancestry, command line, directory -------
def proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, session id, start time in clock ticks), from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return out


def ours(sids: set[int], root: Path) -> set[tuple[int, int]]:
    """(pid, start time) of every process in one of the sessions ``sids``, descended from one, or
    whose command line or working directory names ``root``."""
    table = proc_table()
    keep = {pid for pid, (_, sid, _) in table.items() if sid in sids}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if pid not in keep and ppid in keep:
                keep.add(pid)
                grew = True
    for pid in table:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if str(root) in cmd or cwd == str(root) or cwd.startswith(str(root) + "/"):
            keep.add(pid)
    keep.discard(os.getpid())
    return {(pid, table[pid][2]) for pid in keep if pid in table}


def alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    table = proc_table()
    return {(pid, start) for pid, start in procs if pid in table and table[pid][2] == start}


# ---- --help, and failing clearly ----------------------------------------------------------------
@pytest.mark.parametrize("args", [[CLUSTER, "--help"], [CLUSTER, "head", "--help"],
                                  [CLUSTER, "worker", "--help"], [SUBMIT, "--help"]])
def test_help_works_without_ray(tmp_path, args):
    """--help prints the usage (exit 0) and needs no Ray nor cluster."""
    res = run(args, base_env(tmp_path / "home", RAY_BIN="/nonexistent/ray"), timeout=20)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage:")
    for word in (["--ports-base", "--host", "--temp-dir", "RAY_AUTH_MODE"] if args[0] == CLUSTER
                 else ["--wait-timeout", "--address", "Exit status", "NOPROP_PYTHON"]):
        assert word in res.stdout


def test_worker_with_an_unreachable_head_fails_at_once_in_one_line(tmp_path):
    port = closed_port()
    temp = tmp_path / "w"
    start = time.monotonic()
    res = run([CLUSTER, "worker", "--address", f"127.0.0.1:{port}", "--temp-dir", temp],
              base_env(tmp_path / "home", RAY_BIN=str(REAL_RAY)), timeout=30)
    took = time.monotonic() - start
    assert res.returncode == 3
    line = one_line(res.stderr)
    assert f"127.0.0.1:{port}" in line and "cluster.sh head" in line
    assert took < 8, took
    assert not (temp / "noprop_node.pid").exists()


def test_submit_to_an_unreachable_cluster_fails_at_once_in_one_line(tmp_path):
    """Not after the wait for the job agent (120 s here): nothing listens at the address."""
    port = closed_port()
    start = time.monotonic()
    res = run([SUBMIT, "--address", f"http://127.0.0.1:{port}", "--wait-timeout", "120",
               "--config", "tiny", "--run-dir", tmp_path / "run"],
              base_env(tmp_path / "home", RAY_AUTH_MODE="disabled", RAY_BIN=str(REAL_RAY)), timeout=60)
    took = time.monotonic() - start
    assert res.returncode == 3
    line = one_line(res.stderr)
    assert f"http://127.0.0.1:{port}" in line and "cluster.sh head" in line
    assert took < 8, took


@pytest.mark.parametrize("script", ["head", "submit"])
def test_missing_ray_is_one_line(tmp_path, listener, script):
    env = base_env(tmp_path / "home", RAY_BIN=str(tmp_path / "no" / "ray"), RAY_AUTH_MODE="disabled")
    args = ([CLUSTER, "head", "--temp-dir", tmp_path / "h"] if script == "head" else
            [SUBMIT, "--address", f"127.0.0.1:{listener}", "--run-dir", tmp_path / "run"])
    res = run(args, env, timeout=20)
    assert res.returncode == 1
    assert "RAY_BIN" in one_line(res.stderr)


def test_submit_refuses_bad_arguments_before_any_work(tmp_path, fake_ray, listener):
    env = base_env(tmp_path / "home", RAY_BIN=str(fake_ray / "ray"), RAY_AUTH_MODE="disabled",
                   FAKE_RAY_DIR=str(fake_ray))
    no_address = run([SUBMIT, "--run-dir", tmp_path / "run"], env, timeout=20)
    assert no_address.returncode == 2 and "RAY_ADDRESS" in one_line(no_address.stderr)
    relative = run([SUBMIT, "--address", f"127.0.0.1:{listener}", "--run-dir", "runs/x"], env, timeout=20)
    assert relative.returncode == 2 and "absolute" in one_line(relative.stderr)
    assert calls(fake_ray) == []


# ---- token handling -----------------------------------------------------------------------------
def test_head_generates_a_private_token_and_passes_it_by_path_and_stop_ends_the_node(tmp_path, fake_ray):
    """No token anywhere: the head makes one (64 hex characters, mode 0600) and hands it to
    `ray start` through RAY_AUTH_TOKEN_PATH, never on a command line; --ports-base derives every
    port; `cluster.sh stop` ends exactly that node's processes."""
    tok = tmp_path / "secrets" / "token"
    temp = tmp_path / "h"
    env = base_env(tmp_path / "home", RAY_BIN=str(fake_ray / "ray"), FAKE_RAY_DIR=str(fake_ray))
    res = run([CLUSTER, "head", "--temp-dir", temp, "--token-file", tok, "--ports-base", "30100",
               "--port", closed_port(), "--dashboard-port", closed_port(), "--num-cpus", "0"], env, timeout=30)
    pid = int((temp / "noprop_node.pid").read_text())
    try:
        assert res.returncode == 0, res.stderr
        token = tok.read_text()
        assert re.fullmatch(r"[0-9a-f]{64}", token)
        assert stat.S_IMODE(tok.stat().st_mode) == 0o600
        assert "generated a new Ray auth token" in res.stderr
        recorded = (fake_ray / "env.start").read_text().splitlines()
        assert "RAY_AUTH_MODE=token" in recorded and f"RAY_AUTH_TOKEN_PATH={tok}" in recorded
        (start_call,) = calls(fake_ray)
        assert token not in start_call and token not in res.stdout + res.stderr
        for flag in ("--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                     "--node-manager-port=30100", "--object-manager-port=30101",
                     "--dashboard-agent-listen-port=30102", "--dashboard-agent-grpc-port=30103",
                     "--runtime-env-agent-port=30104", "--metrics-export-port=30105",
                     "--ray-client-server-port=30106", "--min-worker-port=30110",
                     "--max-worker-port=30199", "--num-cpus=0", f"--temp-dir={temp}"):
            assert flag in start_call.split(), flag
        assert "cluster.sh worker --address 127.0.0.1:" in res.stdout
        # The hints run as printed: a worker on this machine needs its own temp dir and ports,
        # and the head's token file; the submit line names the token file and a writable run dir.
        worker = next(line for line in res.stdout.splitlines() if "add a worker:" in line)
        assert "--temp-dir /tmp/ray-worker-1" in worker and "--ports-base 30200" in worker, worker
        assert f"--token-file {tok}" in worker, worker
        submit = next(line for line in res.stdout.splitlines() if "submit a job:" in line)
        assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={tok} bash launch/submit.sh" in submit, submit
        assert f"--run-dir {REPO}/runs/job-demo" in submit and "/abs/path" not in submit, submit
        started = ours({pid}, temp)
        assert started
        # A second node on the same temp dir is refused; the first keeps running.
        again = run([CLUSTER, "head", "--temp-dir", temp, "--token-file", tok], env, timeout=30)
        assert again.returncode == 1 and str(pid) in one_line(again.stderr)
        stop = run([CLUSTER, "stop", "--temp-dir", temp], env, timeout=30)
        assert stop.returncode == 0, stop.stderr
        assert not alive(started)
        assert not (temp / "noprop_node.pid").exists()
    finally:
        for p, _ in alive(ours({pid}, temp)):
            os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize("problem", ["no token", "open file", "short env token"])
def test_workers_and_clients_refuse_a_missing_or_weak_token(tmp_path, listener, fake_ray, problem):
    """Workers and clients never make up a token: without one, with a file others can read, or a
    short secret, they stop in one line (exit 2) before `ray` runs."""
    extra = {}
    if problem == "open file":
        extra["RAY_AUTH_TOKEN_PATH"] = str(token_file(tmp_path / "tok", mode=0o644))
    elif problem == "short env token":
        extra["RAY_AUTH_TOKEN"] = "abc123"
    env = base_env(tmp_path / "home", RAY_BIN=str(fake_ray / "ray"), FAKE_RAY_DIR=str(fake_ray), **extra)
    worker = run([CLUSTER, "worker", "--address", f"127.0.0.1:{listener}", "--temp-dir", tmp_path / "w"],
                 env, timeout=30)
    submit = run([SUBMIT, "--address", f"127.0.0.1:{listener}", "--run-dir", tmp_path / "run"], env, timeout=30)
    expected = {"no token": "no token", "open file": "chmod 600", "short env token": "at least 32"}[problem]
    for res in (worker, submit):
        assert res.returncode == 2
        assert expected in one_line(res.stderr)
    assert calls(fake_ray) == []
    assert not (tmp_path / "home" / ".ray").exists()


def test_opening_the_cluster_to_a_network_needs_token_auth(tmp_path, fake_ray):
    env = base_env(tmp_path / "home", RAY_BIN=str(fake_ray / "ray"), FAKE_RAY_DIR=str(fake_ray),
                   RAY_AUTH_MODE="disabled")
    res = run([CLUSTER, "head", "--host", "0.0.0.0", "--temp-dir", tmp_path / "h"], env, timeout=30)
    assert res.returncode == 2
    assert "token auth must be on" in one_line(res.stderr)
    assert calls(fake_ray) == []


# ---- submit.sh: the job agent, the job's status ---------------------------------------------
def submit_env(tmp_path, fake_ray, **extra) -> dict[str, str]:
    return base_env(tmp_path / "home", RAY_BIN=str(fake_ray / "ray"), FAKE_RAY_DIR=str(fake_ray),
                    RAY_AUTH_TOKEN_PATH=str(token_file(tmp_path / "tok")), **extra)


def test_submit_waits_for_the_job_agent_then_follows_the_job(tmp_path, fake_ray, listener):
    """A fresh head answers "No available agent" for a while: the script retries with the same
    submission id, prints the job id, follows the logs and exits 0 on SUCCEEDED. The token goes
    to `ray` by path, with RAY_AUTH_MODE=token."""
    res = run([SUBMIT, "--address", f"127.0.0.1:{listener}", "--config", "tiny", "--run-dir", tmp_path / "run"],
              submit_env(tmp_path, fake_ray, FAKE_NO_AGENT="2"), timeout=60)
    assert res.returncode == 0, res.stderr
    job = re.search(r"submitted job (\S+) to http://127\.0\.0\.1:%d .*attempt 3" % listener, res.stdout).group(1)
    assert "not ready yet" in res.stderr
    assert "fake: training log line" in res.stdout
    assert f"job {job} SUCCEEDED" in res.stdout
    log = calls(fake_ray)
    submits = [c for c in log if c.startswith("job submit")]
    assert len(submits) == 3 and all(f"--submission-id {job}" in c for c in submits)
    # NOPROP_PYTHON unset: the interpreter `bash launch/setup.sh` makes (the README's set-up).
    assert f"{REPO}/.venv/bin/python launch/job.py train --address auto --config tiny" in submits[0]
    assert any(c.startswith("job logs") and "--follow" in c for c in log)
    recorded = (fake_ray / "env.job").read_text().splitlines()
    assert "RAY_AUTH_MODE=token" in recorded and f"RAY_AUTH_TOKEN_PATH={tmp_path / 'tok'}" in recorded


@pytest.mark.parametrize("status,code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_exits_with_the_jobs_status(tmp_path, fake_ray, listener, status, code):
    res = run([SUBMIT, "--address", f"127.0.0.1:{listener}", "--run-dir", tmp_path / "run"],
              submit_env(tmp_path, fake_ray, FAKE_STATUS=status), timeout=60)
    assert res.returncode == code, res.stderr
    if code:
        line = one_line(res.stderr)
        assert status in line and "ray job logs" in line
        if status == "FAILED":
            assert "exit code 1" in line


def test_submit_names_the_fix_of_a_job_that_cannot_import_the_package(tmp_path, fake_ray, listener):
    """The job's interpreter lacks noprop_dist's dependencies: submit.sh ends with the job's own
    one-line error (what to set), not Ray's generic status message."""
    why = ("noprop-dist job: error: /usr/bin/python cannot import noprop_dist (No module named 'torch'); run "
           "`bash launch/setup.sh` on the head and submit with NOPROP_PYTHON=/path/to/checkout/.venv/bin/python")
    res = run([SUBMIT, "--address", f"127.0.0.1:{listener}", "--run-dir", tmp_path / "run"],
              submit_env(tmp_path, fake_ray, FAKE_STATUS="FAILED", FAKE_LOG=why, NOPROP_PYTHON="/usr/bin/python"),
              timeout=60)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert line.endswith(why.split(": error: ", 1)[1] + "; its logs: " + line.split("; its logs: ")[1]), line
    assert "NOPROP_PYTHON=" in line and "FAILED" in line
    assert "/usr/bin/python launch/job.py train" in next(c for c in calls(fake_ray) if c.startswith("job submit"))


def test_job_entry_without_the_dependencies_is_one_line(tmp_path):
    """launch/job.py run by an interpreter that cannot import torch (python -S: no site-packages)
    prints one line naming NOPROP_PYTHON and launch/setup.sh, exit status 1."""
    res = subprocess.run([sys.executable, "-S", str(REPO / "launch" / "job.py"), "train", "--config", "tiny"],
                         cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 1 and res.stdout == ""
    line = one_line(res.stderr)
    assert line.startswith("noprop-dist job: error: ") and "cannot import noprop_dist (No module named" in line
    assert "NOPROP_PYTHON=" in line and "launch/setup.sh" in line


def test_submit_gives_up_on_the_job_agent_after_the_timeout(tmp_path, fake_ray, listener):
    start = time.monotonic()
    res = run([SUBMIT, "--address", f"127.0.0.1:{listener}", "--wait-timeout", "2", "--run-dir", tmp_path / "run"],
              submit_env(tmp_path, fake_ray, FAKE_NO_AGENT="1000"), timeout=60)
    assert res.returncode == 3
    assert "no job agent ready within 2 s" in res.stderr.splitlines()[-1]
    assert time.monotonic() - start < 15


def test_submit_names_a_refused_token_in_one_line(tmp_path, fake_ray, listener):
    refused = ("ray.exceptions.AuthenticationError: Authentication failed: Forbidden: "
               "Invalid authentication token")
    res = run([SUBMIT, "--address", f"127.0.0.1:{listener}", "--run-dir", tmp_path / "run"],
              submit_env(tmp_path, fake_ray, FAKE_SUBMIT_ERROR=refused), timeout=60)
    assert res.returncode == 3
    line = one_line(res.stderr)
    assert "refused" in line and "Invalid authentication token" in line


# ---- the cluster-launcher template -------------------------------------------------------------
def test_cluster_yaml_is_a_valid_ray_cluster_config_with_the_pinned_versions():
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(YAML.read_text())
    validate_config(cfg)  # Ray 2.60's cluster-config schema
    validate_config(prepare_config(json.loads(json.dumps(cfg))))  # with the AWS defaults filled in
    assert cfg["provider"]["type"] == "aws"
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert any("-c ~/noprop_dist/constraints.txt" in c for c in cfg["setup_commands"])
    for cmd in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=" in cmd
    assert "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][-1]
    # The versions the comments name are the pins of constraints.txt.
    pins = dict(line.strip().split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    text = YAML.read_text()
    for package in ("ray", "torch", "torchvision"):
        assert f"{package}=={pins[package]}" in text, package
    assert text.count("FILL IN") >= 5


# ---- a real cluster: head + two workers, a job through submit.sh ---------------------------------
def free_block(taken: set[int]) -> int:
    """A base N with N..N+99 free on every interface (Ray binds some ports to all of them)."""
    for _ in range(200):
        base = random.randrange(20000, 40000, 100)
        if any(p in taken for p in range(base, base + 100)):
            continue
        try:
            for port in range(base, base + 100):
                with socket.socket() as s:
                    s.bind(("", port))
        except OSError:
            continue
        taken.update(range(base, base + 100))
        return base
    raise RuntimeError("no block of 100 free ports")


@pytest.mark.slow
def test_a_job_submitted_through_the_launch_scripts_runs_its_blocks_on_several_nodes(capsys, record_property):
    """Head (0 CPUs: the driver only) and two worker nodes of 2 CPUs, each a `ray start` of its
    own started by cluster.sh with its own temp dir, ports and custom resource, token auth on;
    the tiny job (T = 4 blocks of 1 CPU) goes through submit.sh, succeeds, and its blocks ran on
    both worker nodes (the run's worker_started events). Prints the time from submit to the
    first training step. Stops only its nodes, and checks that none of its processes remain."""
    root = Path(tempfile.mkdtemp(prefix="npl", dir="/tmp"))  # short: Ray's socket paths
    token = token_file(root / "token")
    env = base_env(root / "home", RAY_BIN=str(REAL_RAY), NOPROP_PYTHON=sys.executable,
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    taken: set[int] = set()
    bases = {name: free_block(taken) for name in ("h", "w1", "w2", "bad")}
    gcs, dash = bases["h"] + 7, bases["h"] + 8  # unused by --ports-base (N..N+6, N+10..N+99)
    sids: set[int] = set()
    started: set[tuple[int, int]] = set()
    try:
        head = run([CLUSTER, "head", "--temp-dir", root / "h", "--port", gcs, "--dashboard-port", dash,
                    "--ports-base", bases["h"], "--num-cpus", "0", "--resources", '{"node_h": 1}'], env, timeout=120)
        if (root / "h" / "noprop_node.pid").exists():
            sids.add(int((root / "h" / "noprop_node.pid").read_text()))
        assert head.returncode == 0, head.stdout + head.stderr

        # A node or a client with another token is turned away at once, in one line.
        wrong = dict(env, RAY_AUTH_TOKEN_PATH=str(token_file(root / "other-token")))
        bad = run([CLUSTER, "worker", "--address", f"127.0.0.1:{gcs}", "--temp-dir", root / "bad",
                   "--ports-base", bases["bad"]], wrong, timeout=60)
        assert bad.returncode == 3 and "refused this node" in bad.stderr.splitlines()[-1], bad.stderr
        assert not alive(ours(set(), root / "bad"))
        refused = run([SUBMIT, "--address", f"http://127.0.0.1:{dash}", "--run-dir", root / "run"], wrong, timeout=60)
        assert refused.returncode == 3 and "refused" in refused.stderr.splitlines()[-1], refused.stderr

        workers = {name: subprocess.Popen(
            ["bash", str(CLUSTER), "worker", "--address", f"127.0.0.1:{gcs}", "--temp-dir", str(root / name),
             "--ports-base", str(bases[name]), "--num-cpus", "2", "--resources", json.dumps({f"node_{name}": 1})],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
            for name in ("w1", "w2")}
        for name, proc in workers.items():
            out, _ = proc.communicate(timeout=120)
            if (root / name / "noprop_node.pid").exists():
                sids.add(int((root / name / "noprop_node.pid").read_text()))
            assert proc.returncode == 0, out

        submitted = time.time()
        res = run([SUBMIT, "--address", f"http://127.0.0.1:{dash}", "--wait-timeout", "60",
                   "--config", "tiny", "--run-dir", root / "run", f"--data.cache_dir={root / 'cache'}",
                   "--cluster.backend=ray", "--cluster.threads_per_worker=1", "--no-progress"], env, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        job = re.search(r"submitted job (\S+) to ", res.stdout).group(1)
        assert f"job {job} SUCCEEDED" in res.stdout
        summary = json.loads((root / "run" / "summary.json").read_text())
        records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]

        listing = subprocess.run([str(REAL_RAY), "list", "nodes", "--address", f"http://127.0.0.1:{dash}",
                                  "--format", "json", "--detail"], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert listing.returncode == 0, listing.stderr
        names = {}
        for node in json.loads(listing.stdout):
            (tag,) = [r for r in node["resources_total"] if r.startswith("node_")]
            names[node["node_id"]] = tag[len("node_"):]
        assert sorted(names.values()) == ["h", "w1", "w2"]
        block_nodes = {unit: names[rec["node"]] for rec in records if rec.get("event") == "worker_started"
                       for unit in rec["units"] if unit.startswith("block_")}
        assert len(block_nodes) == 4
        assert set(block_nodes.values()) == {"w1", "w2"}, block_nodes  # both workers, not the head

        first_step = min(r["first_step_at"] for r in records if r.get("first_step_at"))
        to_first = first_step - submitted
        driver_start = first_step - summary["launch_to_first_step_s"]
        record_property("submit_to_first_step_s", round(to_first, 2))
        with capsys.disabled():
            print(f"\nsubmit.sh -> first training step: {to_first:.1f} s (submit -> driver start "
                  f"{driver_start - submitted:.1f} s, driver start -> first step "
                  f"{summary['launch_to_first_step_s']:.1f} s); blocks on nodes {block_nodes}")
        assert 0 < to_first < 120
    finally:
        started = ours(sids, root)
        stops = [run([CLUSTER, "stop", "--temp-dir", root / name], env, timeout=60)
                 for name in ("w1", "w2", "h") if (root / name / "noprop_node.pid").exists()]
        left = alive(started | ours(sids, root))
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
    assert all(s.returncode == 0 for s in stops), [s.stderr for s in stops]
    assert len(sids) == 3
    assert not left, f"processes left after cluster.sh stop: {sorted(left)}"
