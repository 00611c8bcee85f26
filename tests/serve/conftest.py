"""A viewer over a copy of the session's three-image store, with a learned token beside it,
served on a free loopback port for the whole session."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from serve_helpers import tree


@pytest.fixture(scope="session")
def served_store(tmp_path_factory, multi_store) -> Path:
    from ovstore.optimize import TokenFile, save_token
    from ovstore.store import open_store

    folder = tmp_path_factory.mktemp("serve")
    store = folder / "caps.zarr"
    shutil.copytree(multi_store, store)
    identity = open_store(store).layout.model
    generator = torch.Generator().manual_seed(0)
    token = TokenFile(name="blob", embedding=torch.randn(2, identity.text_encoder_hidden_size, generator=generator),
                      init_word="cat", model_id=identity.id, text_encoder_fingerprint=identity.text_encoder_fingerprint,
                      hidden_size=identity.text_encoder_hidden_size)
    (folder / "tokens").mkdir()
    save_token(token, folder / "tokens" / "blob.safetensors")
    (folder / "notes.safetensors").write_bytes(b"not a token")  # passed over, not listed
    return store


@pytest.fixture(scope="session")
def store_before(served_store) -> dict[str, tuple[int, int]]:
    return tree(served_store)


@pytest.fixture(scope="session")
def server(served_store, store_before):
    from ovstore.serve import make_app

    app = make_app(served_store, port=0)
    thread = threading.Thread(target=app.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield app
    app.shutdown()
    app.server_close()
