"""The docker-compose cluster and its image, checked without a Docker engine.

The compose files are parsed and their security invariants checked: the only published port is
on 127.0.0.1, Ray token authentication is on everywhere with the token from a git-ignored env
file, the nodes refuse to start without a real token, /dev/shm holds the object store, the run
directories live on a shared volume the non-root user can write, health checks gate the
workers, and the GPU override reserves a GPU per worker. The Dockerfile's installs are compared
with constraints.txt. The shell and Python snippets that the containers run (the token guard,
the health check, the build's version check) are run here for real, against stubs.
"""

from __future__ import annotations

import http.server
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / "ray.env.example"
ENV_FILE = DOCKER / "ray.env"
SERVICES = ("ray-head", "ray-worker")
# The object store must hold a training split (CIFAR as float32: 0.6 GB) with room to spare, and
# Ray wants /dev/shm at least 1.1 times the store (its own advice when it falls back to /tmp).
MIN_OBJECT_STORE = 1 << 30
SHM_PER_STORE = 1.1


# ---- helpers -------------------------------------------------------------------------------

def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def merge(base, override):
    """Compose's merge of an override file, for the mappings these files use."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return override


def interpolate(value: str) -> str:
    """Compose's interpolation with an empty environment: `${X:-default}` -> default, `$$` -> `$`."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group(2) or ""
    return re.sub(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}", sub, value)


def command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    return [interpolate(c) for c in cmd]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def env_files(service: dict) -> list[dict]:
    files = service.get("env_file") or []
    files = [files] if isinstance(files, str) else files
    return [{"path": f} if isinstance(f, str) else f for f in files]


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def published_ports(service: dict) -> list[tuple[str | None, str]]:
    """(host_ip or None for every interface, published port) of each `ports` entry."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append((entry.get("host_ip"), str(entry.get("published", entry.get("target")))))
            continue
        spec = interpolate(str(entry)).split("/")[0]
        host_ip = None
        if spec.startswith("["):                        # [ipv6]:published:target
            host_ip, spec = spec[1:].split("]:", 1)
        parts = spec.split(":")
        if len(parts) == 3:
            host_ip, parts = parts[0], parts[1:]
        out.append((host_ip, parts[0]))
    return out


def to_bytes(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", str(size).lower())
    assert m, f"unreadable size {size!r}"
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def flag(cmd: list[str], name: str) -> str | None:
    for arg in cmd:
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")]
    text = re.sub(r"\\\n", "", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    def regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(re.fullmatch(regex(pattern), p) for p in prefixes):
            excluded = not negate
    return excluded


def committable_files() -> list[Path]:
    """Files git would commit: tracked, and untracked ones that are not ignored."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return [ROOT / p for p in out.split("\0") if p]
    skip = {".git", ".venv", "runs", "data", "__pycache__"}
    found = []
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        found += [Path(directory) / f for f in files if f != ENV_FILE.name]
    return found


def git_ignores(path: Path) -> bool:
    if shutil.which("git") and (ROOT / ".git").exists():
        rel = str(path.relative_to(ROOT))
        return subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT).returncode == 0
    patterns = [l.strip() for l in (ROOT / ".gitignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    return dockerignore_excludes(patterns, str(path.relative_to(ROOT)))


@pytest.fixture(scope="module")
def base() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def gpu(base) -> dict:
    return merge(base, load(COMPOSE_GPU))


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def variant(request, base, gpu) -> dict:
    """The cluster as `docker compose` sees it: the base file, and base + GPU override."""
    return base if request.param == "cpu" else gpu


# ---- compose: network and authentication ---------------------------------------------------

def test_both_compose_files_define_head_and_worker(base, gpu):
    for spec in (base, gpu):
        assert set(SERVICES) <= set(spec["services"])


def test_only_the_dashboard_is_published_and_only_on_loopback(variant):
    for name, service in variant["services"].items():
        assert service.get("network_mode") != "host", name
        for host_ip, port in published_ports(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on {host_ip or 'every interface'}"
    head = published_ports(variant["services"]["ray-head"])
    assert [port for _, port in head] == ["8265"], "the head publishes the dashboard/job API only"
    assert not published_ports(variant["services"]["ray-worker"])


def test_token_auth_on_every_node_with_the_token_from_the_env_file(variant):
    for name in SERVICES:
        service = variant["services"][name]
        env = environment(service)
        assert env.get("RAY_AUTH_MODE") == "token", name
        assert "RAY_AUTH_TOKEN" not in env, f"{name}: the token must come from the env file"
        assert "RAY_AUTH_TOKEN=" not in " ".join(command(service)), name
        files = env_files(service)
        assert [f["path"] for f in files] == ["ray.env"], name
        assert (COMPOSE.parent / files[0]["path"]).resolve() == ENV_FILE
        assert files[0].get("required", True) is True, f"{name}: compose must refuse to start without it"


def test_the_nodes_refuse_a_missing_or_placeholder_token(base, tmp_path):
    """Run each service's command as the container would, with a stub `ray`: with the committed
    example env file, or auth disabled, the node stops before Ray; with a real token Ray starts."""
    stub = tmp_path / "bin" / "ray"
    stub.parent.mkdir()
    calls = tmp_path / "calls"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(0o755)
    example = read_env_file(ENV_EXAMPLE)
    path = f"{stub.parent}{os.pathsep}{os.environ['PATH']}"
    for name in SERVICES:
        service = base["services"][name]
        cmd = command(service)
        fixed = environment(service)            # compose: `environment` wins over `env_file`
        cases = [({**example, **fixed}, False),
                 ({**example, **fixed, "RAY_AUTH_TOKEN": "too-short"}, False),
                 ({**example, **fixed, "RAY_AUTH_TOKEN": secrets.token_hex(32),
                   "RAY_AUTH_MODE": "disabled"}, False),
                 ({**example, **fixed, "RAY_AUTH_TOKEN": secrets.token_hex(32)}, True)]
        for env, starts in cases:
            calls.unlink(missing_ok=True)
            env = {k: v for k, v in env.items() if v is not None}
            run = subprocess.run(cmd, env={**env, "PATH": path}, capture_output=True, text=True,
                                 timeout=30)
            started = calls.exists() and calls.read_text().split()[:1] == ["start"]
            assert started == starts, (name, env.get("RAY_AUTH_MODE"), run.stderr)
            assert (run.returncode == 0) == starts, (name, run.returncode, run.stderr)


# ---- compose: health, memory, volumes ------------------------------------------------------

def test_health_checks_gate_the_workers(variant):
    for name in SERVICES:
        check = variant["services"][name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
    depends = variant["services"]["ray-worker"].get("depends_on")
    assert isinstance(depends, dict), "workers must wait for a healthy head"
    assert depends["ray-head"]["condition"] == "service_healthy"


class _FakeDashboard(http.server.BaseHTTPRequestHandler):
    token: str | None = None                     # None: a dashboard without authentication

    def do_GET(self):
        if self.path == "/api/version" and self.token is not None:
            given = self.headers.get("Authorization")
            status = 401 if given is None else 200 if given == f"Bearer {self.token}" else 403
        else:
            status = 200 if self.path in ("/api/version", "/api/gcs_healthz", "/api/healthz") else 404
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server_token, healthy", [("same", True), (None, False), ("other", False)])
def test_the_head_is_healthy_only_if_the_job_api_demands_its_token(base, server_token, healthy):
    test = base["services"]["ray-head"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    token = secrets.token_hex(32)
    handler = type("Handler", (_FakeDashboard,),
                   {"token": {"same": token, "other": secrets.token_hex(32), None: None}[server_token]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = str(server.server_address[1])
        code = re.sub(r"127\.0\.0\.1:(8265|52365)\b", f"127.0.0.1:{port}", interpolate(test[3]))
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RAY_AUTH_TOKEN": token})
    finally:
        server.shutdown()
        server.server_close()
    assert (run.returncode == 0) == healthy, run.stderr


def test_shm_holds_the_object_store(variant):
    for name in SERVICES:
        service = variant["services"][name]
        store = flag(command(service), "--object-store-memory")
        assert store is not None, f"{name}: without a fixed object store Ray takes 30% of host RAM"
        assert int(store) >= MIN_OBJECT_STORE, name
        assert "shm_size" in service, f"{name}: Docker's default /dev/shm is 64 MB"
        assert to_bytes(service["shm_size"]) >= SHM_PER_STORE * int(store), name


def test_run_directories_are_on_a_shared_volume_the_user_can_write(variant):
    for name in SERVICES:
        mounts = {}
        for volume in variant["services"][name].get("volumes") or []:
            if isinstance(volume, dict):
                mounts[volume["target"]] = volume.get("source")
            else:
                source, target = str(volume).split(":")[:2]
                mounts[target] = source
        assert mounts.get("/runs") == "runs", f"{name} does not mount the runs volume on /runs"
    assert "runs" in (variant.get("volumes") or {}), "runs must be a named volume"
    # A named volume starts as a copy of the image's directory, owner included.
    uid = _image_user().split(":")[0]
    runs = " ".join(args for word, args in dockerfile_instructions() if word == "RUN")
    assert re.search(rf"chown\s+(?:-R\s+)?{uid}(?::\d+)?\s[^&;]*/runs\b", runs), \
        f"/runs in the image must belong to uid {uid}"


# ---- image: user, variants, pins -----------------------------------------------------------

def _image_user() -> str:
    instructions = dockerfile_instructions()
    users = [i for i, (word, _) in enumerate(instructions) if word == "USER"]
    assert users, "the image runs as root (no USER)"
    starts = [i for i, (word, _) in enumerate(instructions) if word in ("CMD", "ENTRYPOINT")]
    assert all(users[-1] < i for i in starts), "USER must come before CMD/ENTRYPOINT"
    return instructions[users[-1]][1]


def test_containers_run_as_a_non_root_user(variant):
    user = _image_user().split(":")[0]
    assert user not in ("root", "0"), user
    for name in SERVICES:
        override = str(variant["services"][name].get("user", user)).split(":")[0]
        assert override not in ("root", "0"), f"{name} runs as root"


def test_dockerfile_builds_a_cpu_and_a_cuda_variant():
    instructions = dockerfile_instructions()
    args = {a.split("=")[0]: a.partition("=")[2] for word, a in instructions if word == "ARG"}
    assert args.get("VARIANT") == "cpu", "ARG VARIANT (cpu by default, or cuda)"
    runs = " ".join(a for word, a in instructions if word == "RUN")
    assert re.search(r"\bcpu\)", runs) and re.search(r"\bcuda\)", runs)
    assert "https://download.pytorch.org/whl/cpu" in runs
    # constraints.txt is resolved with the interpreter that runs these tests
    base = " ".join(a for word, a in instructions if word in ("ARG", "FROM"))
    assert re.search(rf"python:{sys.version_info.major}\.{sys.version_info.minor}\b", base), base


def test_dockerfile_installs_only_what_constraints_txt_pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert {"torch", "torchvision", "ray"} <= set(pins)
    instructions = dockerfile_instructions()
    copies = [i for i, (word, a) in enumerate(instructions) if word == "COPY" and "constraints.txt" in a]
    installs = [i for i, (word, a) in enumerate(instructions) if word == "RUN" and "pip install" in a]
    assert installs and copies and copies[0] < installs[0]
    for i in installs:
        for part in re.split(r"&&|;", instructions[i][1]):
            if "pip install" in part:
                assert re.search(r"(-c|--constraint)[ =]constraints\.txt", part), part.strip()
    for word, args in instructions:
        for name, version in re.findall(r"\b([A-Za-z0-9][\w.-]*)==([0-9][^\s\"'\\]*)", args):
            key = re.sub(r"[-_.]+", "-", name).lower()
            assert pins.get(key) == version, f"{name}=={version} in the Dockerfile, constraints.txt: {pins.get(key)}"


@pytest.mark.slow  # several seconds: full suite only (the fast tier stays near a minute)
def test_the_build_fails_when_an_installed_version_is_not_as_pinned(tmp_path):
    """The build's last step compares every installed distribution with constraints.txt; run it
    on this environment, against constraints made to match it and then made to differ."""
    import importlib.metadata as md
    run = [a for word, a in dockerfile_instructions() if word == "RUN" and "constraints.txt" in a
           and "importlib.metadata" in a]
    assert run, "no build step checks the installed versions against constraints.txt"
    check = run[0][run[0].index("python -c"):]
    names = {}
    for dist in md.distributions():
        names[re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()] = dist.version.split("+")[0]
    names.pop("noprop-dist", None)
    import torch
    variant = "cpu" if torch.version.cuda is None else "cuda"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def build(pins: dict[str, str], variant: str) -> subprocess.CompletedProcess:
        (tmp_path / "constraints.txt").write_text("".join(f"{k}=={v}\n" for k, v in pins.items()))
        return subprocess.run(["sh", "-c", check], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**env, "VARIANT": variant})

    ok = build(names, variant)
    assert ok.returncode == 0, ok.stderr
    bad = build({**{k: v for k, v in names.items() if k != "numpy"}, "ray": "0.0.1"},
                "cuda" if variant == "cpu" else "cpu")
    assert bad.returncode != 0
    assert "ray" in bad.stderr and "numpy" in bad.stderr and "torch" in bad.stderr, bad.stderr


def test_dockerignore_keeps_environments_history_results_and_the_token_out():
    path = ROOT / ".dockerignore"
    assert path.exists(), "without .dockerignore, `COPY . .` copies .venv and .git into the image"
    patterns = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    for out in (".venv/bin/python", ".git/HEAD", "runs/demo/summary.json", "data/x.npz",
                "benchmarks/results/scaling.json", "docker/ray.env", "noprop_dist/__pycache__/cli.pyc",
                "noprop_dist.egg-info/PKG-INFO"):
        assert dockerignore_excludes(patterns, out), f"{out} would be copied into the image"
    for kept in ("constraints.txt", "setup.cfg", "pyproject.toml", "README.md", "docker/Dockerfile",
                 "noprop_dist/cli.py", "noprop_dist/data.py", "noprop_dist/configs/demo.toml"):
        assert not dockerignore_excludes(patterns, kept), f"{kept} would be missing from the image"


# ---- secrets ---------------------------------------------------------------------------------

TOKEN_ASSIGNMENT = re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?([A-Za-z0-9+/_.\-]{16,})")
BEARER = re.compile(r"Bearer\s+([A-Fa-f0-9]{32,}|[A-Za-z0-9+/_\-]{40,})")


def test_no_token_is_committed():
    assert git_ignores(ENV_FILE), "docker/ray.env (the token) must be git-ignored"
    assert not git_ignores(ENV_EXAMPLE), "the example must be committed"
    example = read_env_file(ENV_EXAMPLE)
    assert "RAY_AUTH_TOKEN" in example and len(example["RAY_AUTH_TOKEN"]) < 32
    found = []
    for path in committable_files():
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", "ignore")
        for pattern in (TOKEN_ASSIGNMENT, BEARER):
            found += [f"{path.relative_to(ROOT)}: {m.group(0)[:30]}..." for m in pattern.finditer(text)]
    assert not found, found


def test_gpu_override_reserves_a_gpu_for_each_worker_and_builds_cuda(base, gpu):
    for name in SERVICES:
        assert gpu["services"][name]["build"]["args"]["VARIANT"] == "cuda", name
        assert base["services"][name]["build"]["args"]["VARIANT"] == "cpu", name
        assert gpu["services"][name]["image"] != base["services"][name]["image"], \
            "the CUDA image needs its own tag"
    devices = (gpu["services"]["ray-worker"].get("deploy", {}).get("resources", {})
               .get("reservations", {}).get("devices"))
    assert devices, "the GPU override reserves no device for the workers"
    (device,) = devices
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") == 1 and "device_ids" not in device, "one GPU per worker replica"
    assert "deploy" not in gpu["services"]["ray-head"], "the head (coordinator) needs no GPU"
    assert "deploy" not in base["services"]["ray-worker"], "the CPU cluster reserves no GPU"
