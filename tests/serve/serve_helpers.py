"""The viewer tests' fixtures and requests: a viewer over a copy of the session's three-image
store, with a learned token beside it, on a free loopback port.

The test modules import the fixtures from here (a ``conftest.py`` in this folder would take the
module name ``conftest`` that other test folders import from). Each importing module gets its own
fixture definitions; the store copy and the server are made once and shared by all of them.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

_SHARED: dict[str, object] = {}


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path``: size and modification time (what a write would change)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="session")
def served_store(tmp_path_factory, multi_store) -> Path:
    if "store" not in _SHARED:
        import torch

        from ovstore.optimize import TokenFile, save_token
        from ovstore.store import open_store

        folder = tmp_path_factory.mktemp("serve")
        store = folder / "caps.zarr"
        shutil.copytree(multi_store, store)
        identity = open_store(store).layout.model
        generator = torch.Generator().manual_seed(0)
        hidden = identity.text_encoder_hidden_size
        token = TokenFile(name="blob", embedding=torch.randn(2, hidden, generator=generator), init_word="cat",
                          model_id=identity.id, text_encoder_fingerprint=identity.text_encoder_fingerprint,
                          hidden_size=hidden)
        (folder / "tokens").mkdir()
        save_token(token, folder / "tokens" / "blob.safetensors")
        (folder / "notes.safetensors").write_bytes(b"not a token")  # passed over, not listed
        _SHARED["store"] = store
        _SHARED["before"] = tree(store)  # before any server opened it
    return _SHARED["store"]


@pytest.fixture(scope="session")
def store_before(served_store) -> dict[str, tuple[int, int]]:
    return _SHARED["before"]


@pytest.fixture(scope="session")
def server(request, served_store, store_before):
    if "server" not in _SHARED:
        from ovstore.serve import make_app

        app = make_app(served_store, port=0)
        threading.Thread(target=app.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        _SHARED["server"] = app

        def stop() -> None:
            app.shutdown()
            app.server_close()
            _SHARED.pop("server", None)

        request.addfinalizer(stop)
    return _SHARED["server"]


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
