"""--generation-context maps streamed to .zarr (equal to the in-memory maps, written in blocks
of images, published only complete) and their checks as a Python user meets them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

V1 = Path(__file__).parent.parent / "data" / "v1-store"


def test_streamed_zarr_equals_the_in_memory_context_maps(multi_store, tmp_path):
    import xarray as xr

    from ovstore.analyze import MapConfig, compute_context_maps, write_context_maps_zarr

    for k, config in enumerate((MapConfig(), MapConfig(size=(16, 16), normalize="max", steps="0,-1"))):
        memory = compute_context_maps(multi_store, config=config)
        out = write_context_maps_zarr(multi_store, tmp_path / f"{k}.zarr", config=config, block_images=2)
        ds = xr.open_zarr(out, consolidated=False)
        streamed = ds["ovam_maps"].load()
        assert streamed.dims == memory.dims == ("image", "token", "y", "x")
        assert streamed.shape == (3, 77, *(config.size or (32, 32)))
        np.testing.assert_array_equal(streamed.values, memory.values)  # exactly, not within a tolerance
        assert set(streamed.coords) == set(memory.coords)
        for name in memory.coords:
            assert streamed[name].dims == memory[name].dims, name
            np.testing.assert_array_equal(streamed[name].values, memory[name].values)
        assert {key: ds.attrs[key] for key in memory.attrs} == memory.attrs
        # per-image contexts (uncond: the negative prompts "", "blurry", ""), each image its own tokens
        assert [len(set(row)) > 2 for row in memory.token_str.values] == [False, True, False]
        assert memory.token_str.values[1, 1] == streamed.token_str.values[1, 1] == "blurry</w>"


def test_context_maps_are_written_in_blocks_of_images(multi_store, tmp_path, monkeypatch):
    """Memory holds at most two blocks of images (one computed, one written), whatever the
    number of images: the writer receives blocks of ``block_images`` consecutive images, and
    never more than two blocks' maps exist between the computation and the disk."""
    import ovstore.analyze.context as context
    import ovstore.analyze.export as export

    yielded, written, blocks, alive = [], [], [], []
    produce, write = context._iter_context_maps, export._write_context_block

    def counting(run):
        for item in produce(run):
            yielded.append(item.image)
            yield item

    def spy(maps, arrays, block, progress):
        blocks.append([item.position for item in block])
        alive.append(len(yielded) - len(written))
        write(maps, arrays, block, progress)
        written.extend(item.image for item in block)

    monkeypatch.setattr(context, "_iter_context_maps", counting)
    monkeypatch.setattr(export, "_write_context_block", spy)
    monkeypatch.setattr(context, "compute_context_maps", lambda *a, **k: pytest.fail("held every image"))
    for block_images in (1, 2):
        yielded.clear(), written.clear(), blocks.clear(), alive.clear()
        export.write_context_maps_zarr(multi_store, tmp_path / f"b{block_images}.zarr", block_images=block_images)
        assert [p for b in blocks for p in b] == [0, 1, 2]
        assert all(len(b) == block_images for b in blocks[:-1]) and 1 <= len(blocks[-1]) <= block_images
        assert max(alive) <= 2 * block_images
    # the default block fits about 64 MB of maps: every image of this small store at once
    blocks.clear()
    export.write_context_maps_zarr(multi_store, tmp_path / "default.zarr")
    assert blocks == [[0, 1, 2]]


def test_interrupted_context_zarr_publishes_nothing(multi_store, tmp_path, monkeypatch):
    import xarray as xr

    import ovstore.analyze.export as export

    out = tmp_path / "c.zarr"
    write = export._write_context_block
    calls = []

    def interrupted(maps, arrays, block, progress):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write(maps, arrays, block, progress)

    monkeypatch.setattr(export, "_write_context_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.write_context_maps_zarr(multi_store, out, block_images=2)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    # an earlier output is kept whole when its replacement is interrupted
    monkeypatch.setattr(export, "_write_context_block", write)
    export.write_context_maps_zarr(multi_store, out, images=[0, 1])
    calls.clear()
    monkeypatch.setattr(export, "_write_context_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.write_context_maps_zarr(multi_store, out, block_images=1, overwrite=True)
    kept = xr.open_zarr(out, consolidated=False)["ovam_maps"]
    assert list(kept.image.values) == [0, 1] and np.isfinite(kept.values).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]


def test_cli_writes_context_zarr_and_overlays(multi_store, tmp_path, monkeypatch, capsys):
    import xarray as xr

    from ovstore.analyze import compute_context_maps
    from ovstore.cli import main

    args = ["maps", multi_store, "--generation-context", "--image", "1", "--out", tmp_path / "c.zarr",
            "--png", tmp_path / "png"]
    monkeypatch.setattr("sys.argv", ["ovstore", *map(str, args)])
    main()
    assert "wrote generation-context maps (1, 77, 32, 32)" in capsys.readouterr().err
    streamed = xr.open_zarr(tmp_path / "c.zarr", consolidated=False)["ovam_maps"]
    memory = compute_context_maps(multi_store, images=[1])
    np.testing.assert_array_equal(streamed.values, memory.values)
    np.testing.assert_array_equal(streamed.token_str.values, memory.token_str.values)
    # the image's own tokens (its negative prompt "blurry": uncond is the store's half)
    assert list(streamed.token_str.values[0, :3]) == ["<|startoftext|>", "blurry</w>", "<|endoftext|>"]
    # one sheet and the words only: start/end-of-text and the padding are hidden by default
    assert [p.name for p in (tmp_path / "png").glob("00001_p000_t*.png")] == ["00001_p000_t01_blurry.png"]
    assert (tmp_path / "png" / "00001_p000.png").exists()
    # --png-all-tokens: one picture per context position
    monkeypatch.setattr("sys.argv", ["ovstore", *map(str, args), "--png-all-tokens", "--overwrite"])
    main()
    assert len(list((tmp_path / "png").glob("00001_p000_t*.png"))) == 77


def test_python_users_get_the_cli_checks_of_generation_context(golden_store, tmp_path):
    from ovstore.analyze import (MapConfig, check_context_request, compute_context_maps, context_map_config,
                                 write_context_maps, write_context_maps_zarr)
    from ovstore.errors import IncompleteImageError, InvalidInputError

    out = tmp_path / "c.npy"
    cases = [
        (lambda: check_context_request(golden_store, out, attributions=["cat"]), "drop --attribution"),
        (lambda: check_context_request(golden_store, out, tokens=[tmp_path / "t.safetensors"]), "drop --attribution"),
        (lambda: check_context_request(golden_store, tmp_path / "c.png"), "use a .npy"),
        (lambda: check_context_request(golden_store, out, config=MapConfig(activation="sigmoid")),
         "drop --activation"),
        (lambda: check_context_request(V1 / "store.zarr", out), "does not hold"),
        (lambda: check_context_request(golden_store, out, images=[7]), "out of range"),
        (lambda: context_map_config(activation="sigmoid"), "drop --activation"),
        (lambda: context_map_config(aggregation="median"), "--aggregation 'median' is not one of sum, mean"),
        (lambda: compute_context_maps(V1 / "store.zarr"), "does not hold"),
        (lambda: write_context_maps_zarr(V1 / "store.zarr", tmp_path / "v1.zarr"), "does not hold"),
    ]
    for call, message in cases:
        with pytest.raises((InvalidInputError, IncompleteImageError), match=message) as info:
            call()
        assert "\n" not in str(info.value)
    request = check_context_request(golden_store, out)
    result = write_context_maps(request)
    assert result.path == out.resolve() and np.load(out).shape == (1, 77, 32, 32)
    with pytest.raises(InvalidInputError, match="add --overwrite"):  # refused before any work
        check_context_request(golden_store, out)
    with pytest.raises(InvalidInputError, match="--png .* an input of this command"):
        check_context_request(golden_store, golden_store.parent / "copy.npy", png=golden_store)
    assert not list(tmp_path.glob("v1.zarr*")) and not (golden_store.parent / "copy.npy").exists()
