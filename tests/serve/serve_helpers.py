"""Requests to a running viewer, and a snapshot of a store's files."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path``: size and modification time (what a write would change)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def get(server, target: str, timeout: float = 30) -> tuple[int, bytes, dict[str, str]]:
    """GET ``target`` (relative to the server's root): status, body, headers."""
    try:
        with urllib.request.urlopen(server.url + target.lstrip("/"), timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get_json(server, target: str) -> tuple[int, dict]:
    status, body, headers = get(server, target)
    assert headers["Content-Type"] == "application/json", (target, headers)
    return status, json.loads(body)
