"""docs/cli.md matches the click help; the udev rules stay minimal and safe; README commands."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmbus.cli import docs as cli_docs
from pyvmbus.cli.errors import EXIT_CODES

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "udev" / "90-pyvmbus.rules"


def test_cli_reference_is_in_sync() -> None:
    current = (REPO / "docs" / "cli.md").read_text()
    assert current == cli_docs.render(), "docs/cli.md is stale: run python -m pyvmbus.cli.docs docs/cli.md"


def test_cli_docs_check_and_write(tmp_path: Path) -> None:
    path = tmp_path / "cli.md"
    assert cli_docs.main(["--check", str(path)]) == 1
    assert cli_docs.main([str(path)]) == 0
    assert cli_docs.main(["--check", str(path)]) == 0
    text = path.read_text()
    for row in EXIT_CODES:
        assert f"| {row.code} | {row.name} |" in text
    for cmd in ("vmbus list", "vmbus show", "vmbus bind", "vmbus unbind", "vmbus restore", "vmbus enable",
                "vmbus ring", "vmbus watch", "vmbus mock serve", "vmbus demo"):
        assert f"### {cmd}\n" in text


def _rules() -> list[str]:
    """Rules with continuation lines joined; commented-out rules are returned separately."""
    text = RULES.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_udev_rules_are_minimal_and_safe() -> None:
    rules = _rules()
    assert len(rules) == 3
    for rule in rules:
        for mode in re.findall(r'MODE="(\d+)"', rule):
            assert int(mode, 8) & 0o007 == 0, f"world access in {rule}"
        for cmd in re.findall(r"chmod (\d+)", rule):
            assert int(cmd, 8) & 0o007 == 0, f"world access in {rule}"
        for prog in re.findall(r'RUN\+="(\S+)', rule):
            assert prog.startswith("/"), "RUN needs absolute paths"
        # '$' starts a udev substitution: the shell's own variables must be written '$$'
        assert not re.search(r"(?<!\$)\$(?!\$)", rule.replace("$$", "")), rule
        assert rule.count('"') % 2 == 0
    assert 'GROUP="vmbus"' in rules[0] and 'ATTR{name}=="uio_hv_generic"' in rules[0]
    assert 'DRIVER=="uio_hv_generic"' in rules[1] and "chgrp vmbus" in rules[1]
    assert 'SUBSYSTEM=="channels"' in rules[2] and "uio_hv_generic" in rules[2]
    text = RULES.read_text()
    assert '#ACTION=="add", SUBSYSTEM=="vmbus", ATTR{class_id}==' in text  # the optional boot rule
    assert "groupadd" in text and "udevadm control --reload" in text


@pytest.mark.timeout(30)
@pytest.mark.skipif(shutil.which("udevadm") is None, reason="no udevadm here")
def test_udev_rules_verify(tmp_path: Path) -> None:  # pragma: no cover - needs systemd >= 254
    res = subprocess.run(["udevadm", "verify", str(RULES)], capture_output=True, text=True, timeout=20)
    if "Unknown command" in res.stderr or "unrecognized" in res.stderr:
        pytest.skip("udevadm has no verify")
    assert res.returncode == 0, res.stdout + res.stderr


def test_readme_quick_start() -> None:
    text = (REPO / "README.md").read_text()
    assert "python -m pytest" in text
    assert "vmbus demo" in text
    assert "pip install -e '.[test]'" in text


@pytest.mark.timeout(60)
def test_readme_mock_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "MockVmbus" in b)
    import pyvmbus

    if not hasattr(pyvmbus, "Vmbus"):
        pytest.skip("pyvmbus does not re-export Vmbus yet (DESIGN: from pyvmbus import Vmbus)")
    exec(compile(example, "README.md", "exec"), {})
    assert "hello" in capsys.readouterr().out
