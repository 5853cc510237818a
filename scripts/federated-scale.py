#!/usr/bin/env python3
"""Measures Flower's Simulation Engine running gradguard's ServerApp/ClientApp with N virtual
clients on this machine (docs/FEDERATED.md, "Many clients"): a SuperLink in simulation mode,
`flwr run federated <conn> --federation-config "num-supernodes=N client-resources-num-cpus=1"`,
each virtual node training a TorchScript MLP on its own `partition-<id>/` folder.

Prints, per N: the wall time of each round (round-start to round-end, train + evaluate), the
peak memory of the whole simulation (the SuperLink's process tree: SuperLink, ServerApp,
Ray's processes and workers; PSS summed, sampled every 0.5 s), and how many replies per round
carried a manifest of the required policy that the server verified and aggregated.

    source scripts/env.sh && python scripts/federated-scale.py 10 50 100
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "federated" / "tests"))
from byo import POLICIES, save_mlp, write_node  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(n: int, rounds: int, work: Path) -> dict:
    home, out, data = work / "home", work / "out", work / "data"
    home.mkdir(parents=True)
    model = save_mlp(work / "mlp.pt")
    for p in range(n):
        write_node(data / f"partition-{p}", p, n=200)
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    # The virtual nodes' audit logs and Ray's session go under TMPDIR: a short one (Ray's Unix
    # sockets are limited to 107 bytes of path), removed with the rest.
    short = tempfile.mkdtemp(prefix="gg-scale-", dir="/tmp")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "TMPDIR": short}
    log = open(work / "superlink.log", "wb")
    link = subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
                             "--disable-runtime-dependency-installation"], stdout=log, stderr=subprocess.STDOUT, env=env)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(pss_kib(p) for p in tree(link.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        policy = POLICIES / "mlp-observe.toml"
        config = (f"num-server-rounds={rounds} min-cohort={n} min-nodes={n} round-timeout=1800.0 local-steps=10 lr=0.1 "
                  f"model-path='{model}' data-dir='{data}' default-policy='{policy}' required-policy='{policy}' out-dir='{out}'")
        started = time.monotonic()
        subprocess.run([str(BIN / "flwr"), "run", str(ROOT / "federated"), "sim", "--run-config", config,
                        "--federation-config", f"num-supernodes={n} client-resources-num-cpus=1"], check=True, env=env, capture_output=True)
        events_path = out / "events.jsonl"
        while True:
            events = [json.loads(l) for l in events_path.read_text().splitlines()] if events_path.exists() else []
            if any(e["event"] in ("run-end", "run-failed") for e in events):
                break
            if time.monotonic() - started > 3600:
                raise TimeoutError("the run did not end within an hour")
            time.sleep(0.5)
        total = time.monotonic() - started
    finally:
        stop.set()
        for pid in reversed(tree(link.pid)[1:]):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        link.send_signal(signal.SIGTERM)
        link.wait(timeout=60)
        time.sleep(2)
        for pid in tree(link.pid)[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(short, ignore_errors=True)
    starts = {e["round"]: e["time"] for e in events if e["event"] == "round-start"}
    ends = {e["round"]: e["time"] for e in events if e["event"] == "round-end"}
    per_round = {r["round"]: r for r in (json.loads(l) for l in (out / "rounds.jsonl").read_text().splitlines())}
    verified = {r: sum(c["status"] == "released" and c["reject"] is None for c in per_round[r]["clients"]) for r in ends}
    return {
        "clients": n,
        "round_seconds": {r: round(ends[r] - starts[r], 1) for r in sorted(ends)},
        "run_seconds": round(total, 1),
        "peak_pss_mib": round(peak[0] / 1024),
        "verified_per_round": verified,
        "accuracy": {r: per_round[r].get("federated_accuracy") for r in sorted(ends)},
    }


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10, 50, 100]
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"gradguard-scale-{n}-") as work:
            print(json.dumps(measure(n, 2, Path(work))), flush=True)


if __name__ == "__main__":
    main()
