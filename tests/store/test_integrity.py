"""Checksums on every array, `verify` on damaged stores, and readers that never return
damage as data."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from ovstore.errors import StoreDamagedError, StoreError
from ovstore.store import StoreWriter, open_store, verify_store
from ovstore.store import format as fmt


@pytest.fixture
def copy(multi_store, tmp_path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(multi_store, path)
    return path


def flip(path: Path, offset: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset)] ^= 0x10
    path.write_bytes(bytes(data))


def cli(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    from ovstore.cli import main

    monkeypatch.setattr(sys, "argv", ["ovstore", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [l for l in err.splitlines() if l.strip()]


def test_every_array_is_checksummed(multi_store):
    store = open_store(multi_store)
    assert store.fully_checksummed
    names = [*fmt.PER_IMAGE_ARRAYS]
    for info in store.layers:
        names += [f"layers/{info.name}/{n}" for n in (fmt.QUERIES, fmt.TO_K_WEIGHT, fmt.TO_K_BIAS)]
    for name in names:
        meta = json.loads((multi_store / name / "zarr.json").read_text())
        codecs = json.dumps(meta["codecs"])
        assert "crc32c" in codecs, name


ONE_IMAGE = [fmt.PROMPT, fmt.NEGATIVE_PROMPT, fmt.SEED, fmt.GUIDANCE, fmt.NUM_INFERENCE_STEPS, fmt.BRANCH_LABELS,
             fmt.TIMESTEPS, fmt.IMAGES, fmt.STATUS]


@pytest.mark.parametrize("name", [*ONE_IMAGE, "to_k_weight", "to_k_bias"])
def test_a_flipped_byte_anywhere_is_detected_never_returned(copy, name):
    store = open_store(copy)
    layer = store.layers[1].name
    if name.startswith("to_k"):
        chunk = next(p for p in (copy / "layers" / layer / name / "c").rglob("*") if p.is_file())
    else:
        chunk = next(p for p in (copy / name / "c" / "1").parent.rglob("*") if p.is_file() and
                     p.relative_to(copy / name / "c").parts[0] == "1")
    flip(chunk)
    report = verify_store(open_store(copy))
    assert not report.ok
    (problem,) = report.problems
    assert problem.kind == "corrupt"
    if name.startswith("to_k"):
        assert problem.image is None and problem.array.endswith(f"{layer}/{name}")
        with pytest.raises(StoreError, match="corrupted"):
            open_store(copy).key_projection(layer)
    else:
        assert problem.image == 1 and problem.array == name
        readers = {fmt.IMAGES: lambda s: s.image(1), fmt.TIMESTEPS: lambda s: s.timesteps(1),
                   fmt.BRANCH_LABELS: lambda s: s.branch_labels(1), fmt.STATUS: lambda s: s.status()}
        with pytest.raises(StoreError, match="corrupted"):
            readers.get(name, lambda s: s.record(1))(open_store(copy))


def test_missing_chunks_are_damage(copy):
    (copy / fmt.IMAGES / "c" / "0" / "0" / "0" / "0").unlink()
    (copy / fmt.SEED / "c" / "2").unlink()
    store = open_store(copy)
    with pytest.raises(StoreError, match="missing"):
        store.image(0)  # never an all-black image
    with pytest.raises(StoreError, match="missing"):
        store.record(2)  # never seed 0
    kinds = {(p.image, p.array, p.kind) for p in verify_store(store).problems}
    assert kinds == {(0, fmt.IMAGES, "missing"), (2, fmt.SEED, "missing")}


def test_verify_reports_damaged_metadata_instead_of_crashing(copy, monkeypatch, capsys):
    status_meta = copy / fmt.STATUS / "zarr.json"
    status_meta.write_text(status_meta.read_text()[:40])  # truncated
    report = verify_store(open_store(copy))
    assert [(p.array, p.kind) for p in report.problems] == [(fmt.STATUS, "unreadable metadata")]
    code, lines = cli(monkeypatch, capsys, "verify", copy)
    assert code == 1 and any("status: unreadable metadata" in l for l in lines)
    assert "damaged images: []" not in lines[-1] and "store-level problems" in lines[-1]
    code, lines = cli(monkeypatch, capsys, "info", copy)
    assert code == 2 and len(lines) == 1 and "damaged" in lines[0]

    root = zarr.open_group(copy, mode="r+")
    meta = dict(root.attrs["ovstore"])
    del meta["layout"]["codec"]
    root.attrs["ovstore"] = meta
    with pytest.raises(StoreDamagedError, match="layout record is damaged"):
        open_store(copy)
    code, lines = cli(monkeypatch, capsys, "verify", copy)
    assert code == 1 and lines[0].startswith("damaged:") and "codec" in lines[0]

    (copy / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    code, lines = cli(monkeypatch, capsys, "verify", copy)
    assert code == 1 and "cannot be read" in lines[0]


def test_verify_reports_nan_queries_and_leftovers(copy, monkeypatch, capsys):
    store = open_store(copy)
    layer = store.layers[2].name
    arr = zarr.open_array(copy / "layers" / layer / fmt.QUERIES, mode="r+")
    data = arr[1]
    data[0, 0, 0, 0, 0, 0] = np.inf
    data[0, 1, 0, 0, 0, 1] = np.nan
    arr[1] = data  # bypasses ovstore's own refusal, as a foreign or buggy writer would
    (copy / fmt.STATUS / "c" / "zarr.0123.partial").write_bytes(b"half")
    report = verify_store(open_store(copy))
    assert [(p.image, p.array, p.kind, p.detail) for p in report.problems] == \
        [(1, layer, "not finite", "2 NaN or Inf values")]
    assert [p.name for p in report.leftovers] == ["zarr.0123.partial"]
    code, lines = cli(monkeypatch, capsys, "verify", copy)
    assert code == 1 and "1 damaged images: [1]" in lines[-1] and "leftover temporary files" in lines[-1]


def test_older_stores_without_full_checksums_still_verify(copy):
    root = zarr.open_group(copy, mode="r+")
    meta = dict(root.attrs["ovstore"])
    del meta["integrity"]
    root.attrs["ovstore"] = meta
    report = verify_store(open_store(copy))
    assert report.ok and report.checked_images == 3 and "before every array had a checksum" in report.notes[0]


def test_info_ratio_counts_only_complete_images(multi_store, tmp_path):
    store = open_store(multi_store)
    out = tmp_path / "partial.zarr"
    shutil.copytree(multi_store, out)
    writer = StoreWriter.open(out, store.layout)
    (slot,) = writer.reserve([store.record(0)])
    writer.write_image(slot, image=store.image(0), timesteps=store.timesteps(0), branch_labels=("uncond",),
                       queries={l.name: store.queries(l.name, 0, branch=None) for l in store.layers},
                       context=store.context(0))
    partial = open_store(out).summary()  # slot 3 written but not marked complete
    assert partial.n_complete == 3 and partial.n_images == 4
    assert partial.query_bytes_on_disk == store.summary().query_bytes_on_disk
    assert partial.compression_ratio == pytest.approx(store.summary().compression_ratio)


def test_images_command_skips_and_lists_damaged_images(copy, tmp_path, monkeypatch, capsys):
    flip(next(p for p in (copy / fmt.IMAGES / "c" / "1").rglob("*") if p.is_file()))
    code, lines = cli(monkeypatch, capsys, "images", copy, "--out", tmp_path / "png")
    assert code == 2 and "wrote 2 images" in lines[0] and "damaged and were skipped: [1]" in lines[-1]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["00000.png", "00002.png"]
