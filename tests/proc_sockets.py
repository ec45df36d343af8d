"""Test helpers that read /proc: the process tree of a driver and the TCP sockets it listens
on (what the security tests check: every server of a private Ray on loopback)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (Linux: read from /proc). For a driver that started a
    private Ray: the driver, the Ray system processes and the workers."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue   # ended meanwhile
        ppid = int(stat.rpartition(")")[2].split()[1])   # the name in (...) may hold spaces
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def process_name(pid: int) -> str:
    """A readable name: ``raylet``, ``gcs_server``, ``ray::IDLE``, ``dashboard.py``, ``python``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace").strip() for a in argv if a.strip()]
    if not args:
        return "?"
    if args[0].startswith("ray::"):
        return args[0].split()[0]
    name = os.path.basename(args[0])
    if name.startswith("python"):
        scripts = [os.path.basename(a) for a in args[1:] if a.endswith(".py")]
        return scripts[0] if scripts else name
    return name


def listening_sockets(root: int | None = None) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket in LISTEN state held by process
    ``root`` (default: this one) or its descendants, sorted. Linux only (reads /proc); sockets
    of processes this user may not inspect are left out."""
    inodes = _listening_inodes()
    found = set()
    for pid in process_tree(os.getpid() if root is None else root):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                address, port = inodes[target[8:-1]]
                found.add((address, port, process_name(pid)))
    return sorted(found, key=lambda s: (s[2], s[1], s[0]))


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """socket inode -> (address, port) of the TCP sockets in LISTEN state (state 0A)."""
    out = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            if sys.byteorder == "little":   # the kernel prints 32-bit words in host order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[fields[9]] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return out
