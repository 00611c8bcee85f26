"""The drawing code of `maps --png`, the demo and the README (ovstore.pictures)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from ovstore import pictures

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def _maps(tokens: list[str], values: np.ndarray, *, ids: list[int] | None = None, prompt: str = "p",
          attrs: dict | None = None) -> xr.DataArray:
    """Maps of one image and one prompt, as compute_maps lays them out."""
    n = len(tokens)
    return xr.DataArray(
        values[None].astype(np.float32), dims=("image", "token", "y", "x"),
        coords={"image": [0], "prompt": ("token", [prompt] * n), "prompt_index": ("token", [0] * n),
                "position": ("token", list(range(n))), "token_str": ("token", tokens),
                "token_id": ("token", ids if ids is not None else list(range(100, 100 + n)))},
        attrs=attrs if attrs is not None else {"activation": "token_softmax", "normalize": "none",
                                               "steps": [0, 1], "layers": ["l0", "l1", "l2"]})


def _softmax_maps(tokens: list[str], seed: int = 0, size: int = 8) -> np.ndarray:
    """Token maps whose sum over tokens is 2 calls x 4 heads x 3 layers = 24 at every pixel."""
    rng = np.random.default_rng(seed)
    p = rng.random((len(tokens), size, size)) + 0.1
    return 24 * p / p.sum(0)


def test_a_word_split_into_sub_tokens_is_one_tile():
    tokens = [SOT, "a</w>", "poin", "ty</w>", "shape</w>", EOT]
    values = _softmax_maps(tokens)
    tiles = pictures.word_tiles(_maps(tokens, values))
    assert [t.label for t in tiles] == ["pointy", "shape"]
    np.testing.assert_allclose(tiles[0].values, (values[2] + values[3]) / 24, rtol=1e-5)
    assert tiles[0].position == 2 and tiles[1].position == 4


def test_special_and_filler_tokens_are_hidden_unless_asked_for():
    tokens = [SOT, "a</w>", "red</w>", "ball</w>", "next</w>", "to</w>", "a</w>", "box</w>", ",</w>", EOT]
    maps = _maps(tokens, _softmax_maps(tokens))
    assert [t.label for t in pictures.word_tiles(maps)] == ["red", "ball", "box"]
    everything = pictures.word_tiles(maps, all_tokens=True)
    assert [t.label for t in everything] == [SOT, "a", "red", "ball", "next", "to", "a", "box", ",", EOT]
    assert {t.kind for t in everything} == {"special", "filler", "word"}


def test_padding_after_the_end_of_text_is_hidden():
    """Generation-context maps carry the padding the pipeline encoded (here SDXL's '!')."""
    tokens = [SOT, "a</w>", "cat</w>", EOT, "!</w>", "!</w>", EOT]
    maps = _maps(tokens, _softmax_maps(tokens))
    assert [t.label for t in pictures.word_tiles(maps)] == ["cat"]
    kinds = [t.kind for t in pictures.word_tiles(maps, all_tokens=True)]
    assert kinds == ["special", "filler", "word", "special", "padding", "padding", "padding"]


def test_learned_tokens_are_shown():
    tokens = [SOT, "circle*"]
    tiles = pictures.word_tiles(_maps(tokens, _softmax_maps(tokens), ids=[-1, -1]))
    assert [(t.label, t.kind) for t in tiles] == [("circle*", "learned")]


def test_softmax_maps_are_drawn_as_shares_of_attention_and_others_raw():
    tokens = [SOT, "cat</w>", EOT]
    values = _softmax_maps(tokens)
    scale = pictures.value_scale(_maps(tokens, values))
    assert scale.share and scale.divisor == pytest.approx(24) and "share of each pixel's attention" in scale.description
    assert "2 UNet calls and 3 layers" in scale.description
    normalised = _maps(tokens, values, attrs={"activation": "token_softmax", "normalize": "max"})
    raw = pictures.value_scale(normalised)
    assert not raw.share and raw.divisor == 1 and "normalised per map: max" in raw.description
    # a subset of a prompt's tokens does not add up to a constant: raw values
    assert not pictures.value_scale(_maps(tokens, values).isel(token=[1])).share


def _image(size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_one_colour_scale_is_shared_by_the_tiles_of_a_sheet():
    """A map half of another is darker everywhere on the sheet, by the colour map's own
    values: no tile is stretched to its own maximum."""
    import matplotlib

    ramp = np.tile(np.linspace(0.2, 1.0, 32), (32, 1))
    strong = pictures.MapTile("strong", ramp)
    weak = pictures.MapTile("weak", ramp / 2)
    sheet = pictures.map_sheet([pictures.SheetRow(_image(), [strong, weak])], values="test", outlines=False)
    assert sheet.vmax == pytest.approx(1.0)
    a, b = sheet.panel("r0:t0:strong").astype(int), sheet.panel("r0:t1:weak").astype(int)
    assert a.shape == b.shape == (192, 192, 3)
    lum = np.array([0.299, 0.587, 0.114])
    assert ((a @ lum) > (b @ lum) + 5).mean() > 0.95  # darker, pixel by pixel
    expected = (matplotlib.colormaps["viridis"](ramp[0, 5] / 2)[:3] * np.array(255)).round()
    np.testing.assert_allclose(b[0, 30], expected, atol=1)  # source pixel x=5, its value on the scale 0..1
    # drawn alone, the weak map keeps its values: the same colours as on the shared sheet
    alone = pictures.map_sheet([pictures.SheetRow(_image(), [weak])], vmax=sheet.vmax, outlines=False)
    np.testing.assert_array_equal(alone.panel("r0:t0:weak"), sheet.panel("r0:t1:weak"))
    own = pictures.map_sheet([pictures.SheetRow(_image(), [weak])], outlines=False)  # its own top: brighter
    assert own.vmax == pytest.approx(0.5) and (own.panel("r0:t0:weak") @ lum).mean() > (b @ lum).mean() + 20


def test_small_images_and_maps_are_enlarged_nearest_neighbour():
    image = _image()
    values = np.random.default_rng(1).random((32, 32))
    sheet = pictures.map_sheet([pictures.SheetRow(image, [pictures.MapTile("w", values)])], outlines=False)
    assert pictures.upscale_factor(image.shape) == 6
    panel = sheet.panel("r0:image").reshape(32, 6, 32, 6, 3)
    np.testing.assert_array_equal(panel, np.broadcast_to(image[:, None, :, None], panel.shape))  # blocks = pixels
    tile = sheet.panel("r0:t0:w").reshape(32, 6, 32, 6, 3)
    assert (tile == tile[:, :1, :, :1]).all()  # every block one colour
    big = np.zeros((400, 300, 3), np.uint8)
    assert pictures.upscale_factor(big.shape) == 1 and pictures.upscale(big, 1) is big


def test_outlines_follow_the_objects_of_the_image():
    image = np.full((32, 32, 3), 240, np.uint8)
    image[8:16, 8:16] = (230, 20, 20)
    tile = pictures.MapTile("w", np.zeros((32, 32)))
    sheet = pictures.map_sheet([pictures.SheetRow(image, [tile])])
    panel = sheet.panel("r0:t0:w")
    white = (panel == 255).all(-1)
    assert white.any() and not white[:40].any() and not white[100:].any()  # only around rows 8..16 (x6)
    assert white[47:97, 47:97].sum() == white.sum()


def test_label_previews_carry_a_legend_of_every_class():
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 251) + [224, 224, 192]
    label = np.zeros((32, 32), np.uint8)
    label[4:12, 4:12] = 1
    label[20:28, 20:28] = 3
    label[0, 0] = 255
    classes = ("background", "circle", "square", "triangle")
    legend = pictures.label_legend(classes, palette, present=[0, 1, 3, 255])
    assert [(e.name, e.rgb) for e in legend] == [("background", (0, 0, 0)), ("circle", (128, 0, 0)),
                                                 ("square", (0, 128, 0)), ("triangle", (128, 128, 0)),
                                                 ("ignore", (224, 224, 192))]
    assert [e.name for e in pictures.label_legend(classes, palette)] == list(classes)
    sheet = pictures.label_sheet([(_image(), label, "image 0")], classes, palette)
    assert [e.name for e in sheet.legend] == [e.name for e in legend]
    for entry in sheet.legend:  # each swatch is drawn in its class's colour
        swatch = sheet.panel(f"legend:{entry.name}")
        assert (swatch == entry.rgb).all(), entry
    labels = sheet.panel("r0:labels")
    assert tuple(labels[6 * 5, 6 * 5]) == (128, 0, 0) and tuple(labels[6 * 22, 6 * 22]) == (128, 128, 0)


def test_overlay_files_of_a_store_are_words_on_one_scale(multi_store, tmp_path):
    from PIL import Image

    from ovstore.analyze import compute_maps, overlay_files
    from ovstore.store import open_store

    store = open_store(multi_store)
    maps = compute_maps(store, ["a cat and a sofa"], images=[0])
    names = sorted(p.name for p in overlay_files(maps, store.image, tmp_path))
    assert names == ["00000_p000.png", "00000_p000_t02_cat.png", "00000_p000_t05_sofa.png"]
    sheet = np.asarray(Image.open(tmp_path / "00000_p000.png"))
    assert sheet.ndim == 3 and sheet.shape[1] >= 3 * 192  # image + two words, each at least 192 px
    (tmp_path / "all").mkdir()
    every = sorted(p.name for p in overlay_files(maps, store.image, tmp_path / "all", all_tokens=True))
    assert len(every) == 1 + 7 and "00000_p000_t00_startoftext.png" in every  # 7 tokens, 7 words


def test_cli_png_all_tokens(multi_store, tmp_path):
    from typer.testing import CliRunner

    from ovstore.cli import app

    runner = CliRunner()
    args = ["maps", str(multi_store), "-a", "a cat", "--image", "0", "--out", str(tmp_path / "m.npy")]
    result = runner.invoke(app, [*args, "--png", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == ["00000_p000.png", "00000_p000_t02_cat.png"]
    result = runner.invoke(app, [*args, "--png", str(tmp_path / "png"), "--png-all-tokens", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "png").glob("00000_p000_t*.png"))) == 4  # SoT, a, cat, EoT
    result = runner.invoke(app, [*args, "--png-all-tokens", "--overwrite"])
    assert result.exit_code != 0 and "add --png DIR" in str(result.exception)  # main() prints it as one line


def test_the_demo_asks_for_words_that_are_not_in_the_prompt():
    from ovstore.demo import open_vocabulary

    synonyms, hypernyms = open_vocabulary("a red circle and a blue square")
    assert (synonyms, hypernyms) == ("a red ball and a blue box", "a red shape and a blue object")
    prompt = set("a red circle and a blue square".split())
    assert {"ball", "box", "shape", "object"}.isdisjoint(prompt)
