"""docs/FEDERATED.md's command blocks work from the user's own project folder: gradguard's
scripts and Flower App are named through $GRADGUARD (the checkout), never relative to the
repository root; a policy is a shipped name or an absolute path; and every `flwr run` after a
`flower-superlink` first waits for the SuperLink's port (scripts/wait-for-port.sh)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "FEDERATED.md"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_command_blocks():
    blocks = bash_blocks()
    assert len(blocks) >= 6
    assert any("export GRADGUARD=" in b for b in blocks)


def test_scripts_and_the_app_are_named_through_the_checkout():
    for block in bash_blocks():
        for m in re.finditer(r"scripts/", block):
            assert block[: m.start()].endswith("$GRADGUARD/"), f"a script named relative to the repository:\n{block}"
        for line in block.splitlines():
            if re.search(r"\bflwr run\b", line):
                assert 'flwr run "$GRADGUARD/federated"' in line, line
            if re.search(r"\bsource\b", line):
                assert 'source "$GRADGUARD/scripts/env.sh"' in line, line


def test_policies_are_shipped_names_or_absolute_paths():
    for block in bash_blocks():
        for kind, value in re.findall(r"((?:default-|required-)?policy)='([^']*)'", block):
            assert value.startswith("$PWD/") or value.startswith("${") or "/" not in value, (kind, value)


def test_flwr_run_waits_for_the_superlink():
    for block in bash_blocks():
        lines = block.splitlines()
        started = {}
        for i, line in enumerate(lines):
            m = re.search(r"flower-superlink .*--port (\d+)", line)
            if m:
                started[m.group(1)] = i
            if re.search(r"\bflwr run\b", line):
                for port, at in started.items():
                    waits = [j for j in range(at + 1, i) if re.search(rf'wait-for-port\.sh" 127\.0\.0\.1 {port}\b', lines[j])]
                    assert waits, f"`flwr run` does not wait for the SuperLink on {port}:\n{block}"
