"""Ports for engines are picked below the kernel's ephemeral range: one picked inside it can be taken by an outgoing
connection's local port before the engine binds it (waker/runtime/base.py `free_port`)."""

import socket

import pytest

from waker.runtime import base


def test_a_picked_port_is_free_and_below_the_ephemeral_range() -> None:
    low = base._ephemeral_low()
    for _ in range(20):
        port = base.free_port()
        if low > 2048:
            assert max(1024, low - 16384) <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: nobody holds it


def test_a_port_in_use_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken, socket.socket() as other:
        taken.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        used, free = taken.getsockname()[1], other.getsockname()[1]
        other.close()  # free again: the pick may have it
        monkeypatch.setattr(base, "_ephemeral_low", lambda: 65535)
        choices = iter([used, used, free])
        monkeypatch.setattr(base.random, "randint", lambda a, b: next(choices))
        assert base.free_port() == free


def test_without_a_known_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_ephemeral_low", lambda: 0)
    port = base.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
