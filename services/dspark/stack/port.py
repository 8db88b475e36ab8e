"""A free TCP port for a local stack, a benchmark or a test, chosen where nobody else will take it first.

Asking the kernel for port 0 and closing the socket leaves a window: until the caller binds the port, any
process that also asks for port 0 may be handed it. A local Ray instance is many such processes (raylet,
workers, agents) started between our choice and Ray Serve's proxy binding the gRPC port, and Ray picks its
own ports at random between the kernel's answer and 65535 — a CI run failed with "Failed to bind to address
[::]:40841". So the port is chosen below the kernel's ephemeral range (which port 0 never returns) and above
Ray's worker ports (10002-19999 by default), and checked free on IPv4 and, where there is one, IPv6.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port
FALLBACK_EPHEMERAL_START = 32768  # Linux's default when /proc says nothing
_handed_out: set[int] = set()  # a stack asks for six ports before it binds any: never the same one twice


def ephemeral_start(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    """The lowest port the kernel hands out for port 0."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return FALLBACK_EPHEMERAL_START


def is_free(port: int) -> bool:
    """Nobody listens on `port` on IPv4, nor on IPv6 where the host has it (a server binding [::] needs both)."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        with s:
            try:
                s.bind((host, port))
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == 99:  # EADDRNOTAVAIL: IPv6 disabled
                    continue
                return False
    return True


def free_port(rng: random.Random | None = None, tries: int = 200) -> int:
    """A port between Ray's worker ports and the ephemeral range, free now and not handed out before by this
    process; port 0's answer if there is none."""
    rng = rng or random.SystemRandom()
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral_start() - 1
    for _ in range(tries if high > low else 0):
        port = rng.randint(low, high)
        if port not in _handed_out and is_free(port):
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
