"""scripts/wait-for-port.sh, which docs/FEDERATED.md runs between starting flower-superlink and
`flwr run`: it waits for a listener that comes up late, and gives up with a message (exit 1) on
a port where nothing listens."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "wait-for-port.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - start


def test_it_waits_for_a_listener_that_starts_late():
    port = free_port()
    ready = threading.Event()
    done = threading.Event()

    def listen_later():
        time.sleep(1.5)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
            ready.set()
            done.wait(30)

    listener = threading.Thread(target=listen_later, daemon=True)
    listener.start()
    try:
        out, elapsed = wait("127.0.0.1", str(port), "20")
        assert out.returncode == 0, out.stderr
        assert ready.is_set()
        # It did wait (the listener came up 1.5 s in), and returned soon after the port opened.
        assert 1.4 <= elapsed < 10, elapsed
        assert out.stdout == "" and out.stderr == ""
    finally:
        done.set()
        listener.join(5)


def test_it_times_out_with_a_message_on_a_closed_port():
    port = free_port()
    out, elapsed = wait("127.0.0.1", str(port), "2")
    assert out.returncode == 1
    assert f"nothing listens on 127.0.0.1:{port} after 2 s" in out.stderr
    assert 1.0 <= elapsed < 10, elapsed


def test_bad_arguments_are_a_usage_error():
    for args, needle in [((), "usage:"), (("127.0.0.1",), "usage:"), (("127.0.0.1", "http"), "PORT must be 1..65535"),
                         (("127.0.0.1", "9100", "soon"), "TIMEOUT_SECONDS must be a whole number")]:
        out, _ = wait(*args)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr)
