"""The viewer's HTTP API on a real server over a small store: the values it sends are those of
`ovstore maps` / `ovstore label`, bad requests get one-line JSON errors, nothing outside the
store's images and the package's assets is served, the store is never written, and a burst of
a hundred concurrent requests is answered or refused cleanly."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image
from serve_helpers import get, get_json, server, served_store, store_before, tree  # noqa: F401 (fixtures)

TEXT = "a cat and a sofa"


def _maps_values(body: dict) -> np.ndarray:
    h, w = body["size"]
    return np.stack([np.frombuffer(base64.b64decode(im["maps"]), dtype="<f4").reshape(len(body["tokens"]), h, w)
                     for im in body["images"]])


def test_info_describes_the_store(server, served_store):
    from ovstore.store import open_store

    store = open_store(served_store)
    status, info = get_json(server, "/api/info")
    assert status == 200
    assert [im["image"] for im in info["images"]] == store.complete_images()
    assert [im["prompt"] for im in info["images"]] == [store.record(i).prompt for i in store.complete_images()]
    assert [l["name"] for l in info["layers"]] == [l.name for l in store.layers]
    assert info["model"]["id"] == store.layout.model.id
    assert info["image_size"] == [store.layout.height, store.layout.width]
    assert [t["name"] for t in info["learned_tokens"]] == ["blob"]  # the damaged file beside it is passed over


def test_maps_are_the_arrays_of_ovstore_maps(server, served_store):
    from ovstore.analyze import compute_maps

    status, body = get_json(server, f"/api/maps?text={quote(TEXT)}&page=0&per_page=24")
    assert status == 200
    expected = compute_maps(served_store, [TEXT])
    assert [im["image"] for im in body["images"]] == list(expected["image"].values)
    assert [t["token"] for t in body["tokens"]] == list(expected["token_str"].values)
    got = _maps_values(body)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected.values, rtol=1e-5, atol=1e-6 * float(expected.values.max()))
    # token softmax: every pixel's token sum is the divisor, so values / divisor are shares
    np.testing.assert_allclose(got.sum(axis=1), body["divisor"], rtol=1e-4)
    kinds = {t["text"]: t["kind"] for t in body["tokens"]}
    assert kinds["cat"] == "word" and kinds["a"] == "filler" and kinds["<|startoftext|>"] == "special"
    assert body["command"].startswith("ovstore maps ") and quote(TEXT) not in body["command"]
    assert f"--attribution '{TEXT}'" in body["command"]


def test_one_image_alone_has_the_maps_it_has_in_a_page(server, served_store):
    from ovstore.analyze import compute_maps

    status, body = get_json(server, f"/api/maps?text={quote(TEXT)}&image=1")  # not batched: the engine's own pass
    expected = compute_maps(served_store, [TEXT], images=[1]).values
    np.testing.assert_allclose(_maps_values(body), expected, rtol=1e-5, atol=1e-6 * float(expected.max()))


def test_a_page_and_an_image_list_choose_the_images(server):
    status, body = get_json(server, f"/api/maps?text=cat&page=1&per_page=2")
    assert status == 200 and [im["image"] for im in body["images"]] == [2]
    status, body = get_json(server, f"/api/maps?text=cat&images=2,0")
    assert [im["image"] for im in body["images"]] == [2, 0]
    assert "--image 2 --image 0" in body["command"]


def test_learned_token_maps(server, served_store):
    from ovstore.analyze import compute_maps
    from ovstore.optimize import load_token, token_attribution
    from ovstore.store import open_store

    store = open_store(served_store)
    att = token_attribution(load_token(served_store.parent / "tokens" / "blob.safetensors"), store.layout.model)
    status, body = get_json(server, "/api/maps?learned=blob&images=0,1")
    assert status == 200
    expected = compute_maps(store, [att], images=[0, 1]).values
    np.testing.assert_allclose(_maps_values(body), expected, rtol=1e-5, atol=1e-6 * float(expected.max()))
    assert [t["kind"] for t in body["tokens"]] == ["special", "learned"]
    assert "--token" in body["command"] and "blob.safetensors" in body["command"]


def _png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_map_png_of_one_token_and_of_every_word(server):
    status, one, headers = get(server, f"/api/map.png?image=0&text={quote(TEXT)}&token=2")
    assert status == 200 and headers["Content-Type"] == "image/png"
    status, every, _ = get(server, f"/api/map.png?image=0&text={quote(TEXT)}")
    assert status == 200
    one, every = _png(one), _png(every)
    # one tile beside the image, against the image and one tile per word (cat, sofa)
    assert every.shape[1] > one.shape[1] and every.shape[0] == one.shape[0]
    status, body = get_json(server, f"/api/map.png?image=0&text={quote(TEXT)}&token=99")
    assert status == 400 and "has 7 tokens" in body["error"]


def test_image_png_is_the_stored_image(server, served_store):
    from ovstore.store import open_store

    status, body, _ = get(server, "/api/image.png?image=1")
    assert status == 200
    np.testing.assert_array_equal(_png(body), np.asarray(open_store(served_store).image(1))[..., :3])
    status, body, _ = get(server, "/api/image.png?image=1&size=200")
    assert _png(body).shape[0] >= 200


def test_label_matches_ovstore_label(server, served_store, tmp_path):
    from ovstore.label import label_config, label_store

    query = "/api/label?image=1&classes=cat,car&normalize=max&threshold=0.7"
    status, body = get_json(server, query)
    assert status == 200
    assert body["thresholds"] == [0.7, 0.7] and body["normalize"] == "max"
    assert "--classes cat,car" in body["command"] and "--threshold 0.7" in body["command"]
    assert "--normalize max" in body["command"] and "--image 1" in body["command"]
    label_store(served_store, tmp_path / "labels", label_config(classes="cat,car", normalize="max", threshold=0.7),
                images=[1], scheduler="synchronous")
    written = np.asarray(Image.open(tmp_path / "labels" / "SegmentationClass" / "00001.png"))
    counts = np.bincount(written.ravel(), minlength=3)
    assert body["pixels"] == {"background": int(counts[0]), "cat": int(counts[1]), "car": int(counts[2])}
    status, png, headers = get(server, query.replace("/api/label?", "/api/label.png?"))
    assert status == 200 and headers["Content-Type"] == "image/png" and _png(png).shape[1] > written.shape[1]


@pytest.mark.parametrize("target, status, words", [
    ("/api/maps?text=", 400, "text is empty"),
    ("/api/maps?page=0", 400, "missing parameter text"),
    ("/api/maps?text=" + "a" * 500, 400, "at most 400"),
    ("/api/maps?text=a%01b", 400, "control characters"),
    ("/api/maps?text=" + "cat+" * 90, 400, "at most 77"),
    ("/api/maps?text=cat&image=7", 400, "not a complete image"),
    ("/api/maps?text=cat&image=x", 400, "not an integer"),
    ("/api/maps?text=cat&page=5", 400, "page(s)"),
    ("/api/maps?text=cat&per_page=1000", 400, "out of range"),
    ("/api/maps?text=cat&colour=red", 400, "unknown parameter 'colour'"),
    ("/api/maps?text=cat&text=dog", 400, "given 2 times"),
    ("/api/maps?" + "&".join(f"x{k}=1" for k in range(40)), 400, "too many query parameters"),
    ("/api/maps?learned=nosuch", 400, "learned token 'nosuch' is not known"),
    ("/api/map.png?text=cat", 400, "missing parameter image"),
    ("/api/label?image=0", 400, "missing parameter classes"),
    ("/api/label?image=0&classes=cat&threshold=2", 400, "out of range"),
    ("/api/label?image=0&classes=cat&normalize=z", 400, "not one of minmax, max"),
    ("/api/nothing", 404, "no such page"),
    ("/api/maps?text=" + "word+" * 1000, 414, "at most 4096"),
])
def test_bad_requests_get_a_one_line_json_error(server, target, status, words):
    got, body = get_json(server, target)
    assert got == status
    assert words in body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]


def _raw(server, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as it is (no client-side normalisation of the path)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("path", [
    "/assets/../zarr.json", "/assets/../../pyproject.toml", "/assets/%2e%2e/%2e%2e/pyproject.toml",
    "/assets/..%2f..%2fapp.py", "/../../../../etc/passwd", "//etc/passwd", "/caps.zarr/zarr.json", "/zarr.json",
    "/assets/", "/assets/app.py", "/assets/%00index.html", "/assets//etc/passwd",
])
def test_nothing_but_assets_and_the_api_is_served(server, path):
    status, body = _raw(server, f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    assert status == 404
    assert b"root:" not in body and b"zarr_format" not in body and b"[project]" not in body and b"import" not in body
    assert set(json.loads(body)) == {"error"}


def test_the_page_and_its_assets_are_served(server):
    status, page, headers = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for name in ("app.js", "style.css", "favicon.svg"):
        assert f"/assets/{name}".encode() in page
        status, _, headers = get(server, f"/assets/{name}")
        assert status == 200
    assert b"http://" not in page and b"https://" not in page  # nothing from another site: works offline


def test_writes_and_malformed_requests_are_refused(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("POST", "/api/maps?text=cat", body=b"{}")
    response = conn.getresponse()
    assert response.status == 405 and "read-only" in json.loads(response.read())["error"]
    conn.close()
    status, body = _raw(server, b"BREW /coffee HTCPCP/1.0\r\n\r\n")
    assert status in (400, 501) and "error" in json.loads(body)
    status, body = _raw(server, b"GET /api/info HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
    assert status == 413


def test_a_hundred_concurrent_requests_are_answered_or_refused_cleanly(server):
    words = ["cat", "dog", "sofa", "car", "park", "red", "tree", "house", "blurry", "bird"]
    targets = [f"/api/maps?text={quote(f'a {words[k % 10]} {words[k // 10]}')}&images=0,1,2" for k in range(100)]
    barrier = threading.Barrier(100)

    def one(target: str) -> tuple[int, dict]:
        barrier.wait(timeout=20)
        status, body, headers = get(server, target, timeout=60)
        return status, json.loads(body)

    started = time.perf_counter()
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(one, targets))
    statuses = [s for s, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1
    assert all(len(b["images"]) == 3 for s, b in answers if s == 200)
    assert all("retry later" in b["error"] for s, b in answers if s == 503)
    assert time.perf_counter() - started < 60
    status, info = get_json(server, "/api/info")  # still up
    assert status == 200 and len(info["images"]) == 3


def test_the_store_is_never_written(server, served_store, store_before):
    for target in ("/api/info", "/api/maps?text=a+dog", "/api/map.png?image=2&text=dog", "/api/label?image=2&classes=dog",
                   "/api/image.png?image=0"):
        assert get(server, target)[0] == 200
    assert tree(served_store) == store_before


def test_damaged_stored_data_is_a_one_line_error_and_the_rest_is_served(served_store, tmp_path):
    import shutil

    from ovstore.serve import make_app
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(served_store, damaged)
    layer = open_store(damaged).layers[1].name
    shard = damaged / fmt.LAYERS_GROUP / layer / fmt.QUERIES / "c" / "1" / "0" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01  # image 1's queries of one layer
    shard.write_bytes(bytes(data))
    app = make_app(damaged, port=0)
    threading.Thread(target=app.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        status, body = get_json(app, "/api/maps?text=cat&image=1")
        assert status == 500 and "verify" in body["error"] and "\n" not in body["error"]
        assert get_json(app, "/api/maps?text=cat&image=0")[0] == 200
        assert get_json(app, "/api/maps?text=cat&images=0,1")[0] == 500
        assert get_json(app, "/api/info")[0] == 200
    finally:
        app.shutdown()
        app.server_close()
