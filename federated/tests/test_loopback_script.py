"""docs/FEDERATED.md's loopback deployment, run as written: `scripts/federated-loopback.sh` from
a folder of the user's own (here a temporary one), with ports that are free. The round table
it prints is the documented one: p0 releases every layer noised, p1 withholds conv1, p2 is
blocked, every round aggregated from two of three; and it leaves no process behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "federated-loopback.sh"
DOC = REPO / "docs" / "FEDERATED.md"


def free_base() -> int:
    """A base port whose offsets 0..30 are all free."""
    for base in range(21000, 60000, 97):
        ports = [base, *(base + k for k in (10, 11, 12, 20, 21, 22, 30))]
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_documented_loopback_deployment_runs_as_written(tmp_path):
    env = {**os.environ, "GRADGUARD": str(REPO)}
    done = subprocess.run([str(SCRIPT), str(free_base())], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "out" / "fl-run" / "rounds.txt").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\s+[123]\s", line)]
    assert len(rows) == 3, table
    for row in rows:
        assert "aggregated 2/3" in row, table
        assert "p0: conv1:noise, conv2:noise, fc1:noise, fc2:noise" in row, table
        assert "p1: conv1:withhold" in row and "p2: BLOCKED; blocks: p2" in row, table
    assert float(rows[-1].split()[1]) > 0.6, table
    # Every process the script started is gone.
    pids = [int(p) for p in (tmp_path / "out" / "loopback-pids.txt").read_text().split()]
    assert len(pids) == 4 and not [p for p in pids if alive(p)], pids


def test_the_doc_shows_the_scripts_commands():
    """The loopback block of the doc is the script's: each of its commands is in the script."""
    section = DOC.read_text().split("## A local deployment on loopback", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    assert "scripts/federated-loopback.sh" in block, block
