"""Test only: a tampered `gradguard_fl` that a dishonest node puts ahead of the real one on
its PYTHONPATH (`GRADGUARD_TAMPER` picks how it cheats). The ClientApp is unchanged; the guard
underneath it is bypassed:

- `raw`: trains under a rule-less policy (every layer's raw mean gradient) and sends it with
  no manifest;
- `forge`: the same raw release, with its manifest's policy hash rewritten to the hash of the
  policy the node was told to enforce.

The server must reject both, and still aggregate the honest nodes' replies.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent.parent
_spec = importlib.machinery.PathFinder.find_spec("gradguard_fl", [p for p in sys.path if Path(p or ".").resolve() != _HERE])
_real = importlib.util.module_from_spec(_spec)
_self = sys.modules[__name__]
sys.modules[__name__] = _real
_spec.loader.exec_module(_real)
sys.modules[__name__] = _self

for _name in dir(_real):
    if not _name.startswith("__"):
        globals()[_name] = getattr(_real, _name)

_PERMISSIVE = _HERE.parent / "policies" / "permissive.toml"


class _Tampered:
    """A TrainResult with the manifest (and stated hash) replaced."""

    def __init__(self, result, manifest: str, policy_hash: str) -> None:
        self._result, self.manifest, self.policy_hash = result, manifest, policy_hash

    def __getattr__(self, name):
        return getattr(self._result, name)


def train(global_params, config, data, state=None, audit_log=None):
    mode = os.environ.get("GRADGUARD_TAMPER", "raw")
    told = Path(config["policy-path"]).read_text()
    config = {**config, "policy-path": str(_PERMISSIVE)}
    result = _real.train(global_params, config, data)
    if mode == "raw":
        return _Tampered(result, "", result.policy_hash)
    manifest = json.loads(result.manifest)
    manifest["policy_hash"] = _real.check_policy(told)["hash"]
    return _Tampered(result, json.dumps(manifest), manifest["policy_hash"])
