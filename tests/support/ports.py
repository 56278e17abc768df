"""A free TCP port for a test's torchrun rendezvous (a fixed port can be taken on a shared machine)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS has just handed out on 127.0.0.1 and released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
