"""Helpers shared by the reliability tests: a digest of a folder tree and a CLI runner that
asserts the one-line error contract."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from ovstore.cli import main


def digest(path: Path) -> str:
    """Every file's bytes and every directory's name under ``path``: a created output
    folder or store counts as a change."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def run_cli(monkeypatch, capsys, *args: str) -> str:
    """Run ``ovstore ARGS``; assert a non-zero exit with exactly one stderr line, no traceback;
    return that line."""
    monkeypatch.setattr(sys, "argv", ["ovstore", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
