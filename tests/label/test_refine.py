"""Label masks and refinements: normalisation, adaptive threshold, DenseCRF, small components,
settings checks and the command line's messages."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from ovstore.errors import InvalidInputError
from ovstore.label import (
    LabelConfig, adaptive_threshold, classes_in_prompt, crf_unary, label_mask, normalize_maps, parse_sweep,
    remove_small_components, require_crf,
)
from ovstore.label import voc

HAS_CRF = importlib.util.find_spec("pydensecrf") is not None
SWEEP = parse_sweep("0.3:0.9:0.05")


def test_label_mask_prompt_classes_and_small_components():
    norm = np.zeros((2, 8, 8), np.float32)
    norm[0, :4] = 0.9
    norm[1, 2:6] = 0.7
    labels = label_mask(norm, [0.5, 0.5], [True, True])
    assert (labels[:4] == 1).all() and (labels[4:6] == 2).all() and (labels[6:] == 0).all()
    strict = label_mask(norm, [0.95, 0.5], [True, True])  # per-class threshold: cat (0.9) fails 0.95
    assert (strict[:2] == 0).all() and (strict[2:6] == 2).all()
    only_second = label_mask(norm, [0.5, 0.5], [False, True])
    assert (only_second[2:6] == 2).all() and (only_second[:2] == 0).all() and (only_second[6:] == 0).all()
    speck = labels.copy()
    speck[7, 7] = 2
    cleaned = remove_small_components(speck, 3)
    assert cleaned[7, 7] == 0 and (cleaned[:6] == labels[:6]).all()
    assert classes_in_prompt("Two cats on a Sofa", ["cat", "sofa", "dog"]) == [True, True, False]


def test_class_words_let_a_prompt_name_a_class_by_another_word():
    words = {"circle": ("ball", "disc"), "square": ("box",)}
    assert classes_in_prompt("a red ball and two boxes", ["circle", "square", "triangle"], words) == [True, True, False]
    assert classes_in_prompt("a red ball", ["circle", "square"]) == [False, False]  # without them, names only
    assert classes_in_prompt("a football", ["circle"], words) == [False]  # whole words only
    config = LabelConfig(classes=("circle", "square"), class_words={"circle": ["ball", " disc", "ball"]})
    assert config.class_words == {"circle": ("ball", "disc")} and config.sources["class_words"] == "user"
    assert config.words_of("circle") == ("circle", "ball", "disc") and config.words_of("square") == ("square",)
    assert config.describe()["class_words"] == {"circle": ["ball", "disc"]}
    assert config.provenance()["class_words"] == {"value": {"circle": ["ball", "disc"]}, "source": "user"}


@pytest.mark.parametrize("kwargs, message", [
    ({"class_words": ["dog=puppy"]}, "--class-words names 'dog', which is not in --classes"),
    ({"class_words": ["cat"]}, "--class-words 'cat': write CLASS=WORD,WORD"),
    ({"class_words": ["cat= ,"]}, "--class-words 'cat= ,': write CLASS=WORD,WORD"),
])
def test_bad_class_words_get_one_line(kwargs, message):
    from ovstore.label import label_config

    with pytest.raises(InvalidInputError) as info:
        label_config(classes="cat,sofa", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_label_config_parses_repeated_class_words():
    from ovstore.label import label_config

    config = label_config(classes="cat,sofa", class_words=["cat=kitten,kitty", "sofa=couch", "cat=tabby"])
    assert config.class_words == {"cat": ("kitten", "kitty", "tabby"), "sofa": ("couch",)}


def test_normalisations():
    floor = np.full((1, 10, 10), 0.64)
    floor[0, :2] = 1.0  # an object on 20 % of the image; the rest at the toy-world floor
    assert normalize_maps(floor, "max").min() == pytest.approx(0.64)
    minmax = normalize_maps(floor)
    assert minmax.min() == 0 and minmax.max() == 1 and (minmax >= 0.5).mean() == pytest.approx(0.2)
    assert (normalize_maps(floor, "max") >= 0.5).all()  # max: a 0.5 threshold labels everything
    flat = np.full((2, 4, 4), 3.0)
    assert (normalize_maps(flat) == 0).all() and (normalize_maps(flat, "max") == 1).all()
    with pytest.raises(InvalidInputError, match="--normalize"):
        LabelConfig(classes=("cat",), normalize="mean")
    assert LabelConfig(classes=("cat",)).describe()["normalize"] == "minmax"


def test_adaptive_threshold_takes_the_middle_of_the_longest_stable_range():
    x = np.tile(np.arange(100) / 100, (100, 1))
    m = np.where(x < 0.5, 0.38 * x / 0.5, 0.0)  # left half: a ramp 0 .. 0.38 (area moves)
    m[:, 50:75] = 0.55  # plateau 1: t in (0.38, 0.55] keeps 50 % of the image
    m[:, 75:] = 0.95  # plateau 2: t in (0.55, 0.95] keeps 25 %, over a longer range
    assert adaptive_threshold(m, SWEEP) == pytest.approx(0.75)  # middle of 0.6 .. 0.9
    assert adaptive_threshold(m, tuple(reversed(SWEEP))) == pytest.approx(0.75)  # order does not matter
    assert adaptive_threshold(m, (0.4, 0.45, 0.5, 0.55)) == pytest.approx(0.475)
    # a high floor (max normalisation on toy-world): the whole-image plateau is not "stable"
    floor = np.full((40, 40), 0.64)
    floor[:10, :16] = 1.0
    t = adaptive_threshold(floor, SWEEP)
    assert 0.65 <= t <= 0.9 and (floor >= t).mean() == pytest.approx(0.1)
    # a single peak pixel is not a mask either: the blob's plateau wins
    peak = np.full((100, 100), 0.1)
    peak[20:70, 20:80] = 0.45
    peak[0, 0] = 1.0
    assert adaptive_threshold(peak, SWEEP) == pytest.approx(0.375)
    # no usable plateau: the threshold nearest a usable area
    assert adaptive_threshold(np.zeros((8, 8)), SWEEP) in SWEEP
    with pytest.raises(InvalidInputError, match="at least two"):
        adaptive_threshold(m, (0.5,))


def test_sweep_settings():
    assert parse_sweep("0.5,0.7, 0.6") == (0.5, 0.7, 0.6)
    assert parse_sweep("0.3:0.9:0.05")[-1] == 0.9 and len(SWEEP) == 13
    assert LabelConfig(classes=("cat",), sweep=(0.7, 0.5)).sweep == (0.5, 0.7)
    for bad in ((0.5,), (0.5, 0.5), (0.5, 1.2)):
        with pytest.raises(InvalidInputError):
            LabelConfig(classes=("cat",), adaptive=True, sweep=bad)
    for text in ("0.3:0.9:0", "a,b", "0.9:0.3:0.1"):
        with pytest.raises(InvalidInputError, match="--sweep"):
            parse_sweep(text)


def test_class_names_that_labelmap_txt_cannot_hold():
    with pytest.raises(InvalidInputError, match="':'"):
        LabelConfig(classes=("cat", "traffic:light"))
    with pytest.raises(InvalidInputError, match="duplicates"):
        LabelConfig(classes=("cat", "cat"))
    with pytest.raises(InvalidInputError, match="between 0 and 1"):
        LabelConfig(classes=("cat",), threshold=1.5)


def test_temporaries_never_match_image_globs(tmp_path):
    from ovstore.outputs import temporary_path  # where write_label_png and write_jpeg build their files

    target = tmp_path / "00001.png"
    tmp = temporary_path(target)
    assert tmp.parent == tmp_path and tmp.name.startswith(".00001.png.") and tmp.suffix == ".partial"
    tmp.write_bytes(b"half")
    (tmp_path / ".00002.png.partial.png").write_bytes(b"old-style")  # left by older versions
    (tmp_path / "00000.png").write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [".00002.png.partial.png", "00000.png"]
    assert len(voc.remove_partials(tmp_path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["00000.png"]


def test_crf_unary_keeps_thresholds_deciding():
    maps = np.array([[[0.2, 0.55, 0.9]], [[0.6, 0.5, 0.1]]])
    probs = crf_unary(maps, [0.5, 0.5], [True, True])
    np.testing.assert_array_equal(probs.argmax(0), label_mask(maps, [0.5, 0.5], [True, True]))
    assert crf_unary(maps, [0.95, 0.5], [True, True]).argmax(0).tolist() == [[2, 0, 0]]
    assert crf_unary(maps, [0.5, 0.5], [True, False]).argmax(0).tolist() == [[0, 1, 1]]
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-6)


def test_missing_densecrf_fails_before_writing(multi_store, tmp_path, monkeypatch, capsys):
    from ovstore.cli import main

    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(InvalidInputError, match=r"pip install 'ovstore\[crf\]'"):
        require_crf()
    out = tmp_path / "crf"
    monkeypatch.setattr(sys, "argv", ["ovstore", "label", str(multi_store), "--classes", "cat,dog", "--crf",
                                      "--out", str(out), "--scheduler", "synchronous"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "pip install 'ovstore[crf]' (installs pydensecrf2)" in err, err  # [crf] survives rich markup
    assert not out.exists()  # nothing written


def test_interrupted_label_says_how_to_resume(multi_store, tmp_path, monkeypatch, capsys):
    import ovstore.label
    from ovstore.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ovstore.label, "label_store", interrupted)
    monkeypatch.setattr(sys, "argv", ["ovstore", "label", str(multi_store), "--classes", "cat", "--out",
                                      str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 130
    assert "re-run the same `ovstore label` command" in err and "capture" not in err, err


@pytest.mark.skipif(not HAS_CRF, reason="DenseCRF not installed (pip install 'ovstore[crf]')")
def test_dense_crf_follows_colour_edges_and_thresholds():
    from ovstore.label import dense_crf

    image = np.full((32, 32, 3), 240, np.uint8)
    image[:, :16] = (200, 30, 30)  # a red object on the left half
    x = np.tile(np.arange(32, dtype=np.float32), (32, 1))
    blob = np.clip(1 - np.abs(x - 8) / 14, 0, 1)[None]  # blurry: >= 0.5 only for x in 1 .. 15
    labels = dense_crf(image, blob, [0.5], [True])
    plain = label_mask(blob, [0.5], [True])
    truth = np.zeros((32, 32), np.uint8)
    truth[:, :16] = 1
    assert (labels == truth).mean() > (plain == truth).mean()  # snapped to the colour edge
    assert (labels == truth).mean() > 0.95
    strict = dense_crf(image, blob, [0.97], [True])
    assert (strict == 1).sum() < (labels == 1).sum()  # the threshold still decides
    assert (dense_crf(image, blob, [0.5], [False]) == 0).all()  # a class not allowed never appears


@pytest.mark.skipif(not HAS_CRF, reason="DenseCRF not installed (pip install 'ovstore[crf]')")
def test_label_store_with_crf(multi_store, tmp_path):
    from ovstore.label import label_store

    loose = label_store(multi_store, tmp_path / "a", LabelConfig(classes=("cat", "sofa"), crf=True, threshold=0.3),
                        images=[0], scheduler="synchronous")
    strict = label_store(multi_store, tmp_path / "b", LabelConfig(classes=("cat", "sofa"), crf=True, threshold=0.9),
                         images=[0], scheduler="synchronous")
    from PIL import Image

    a = np.asarray(Image.open(loose.out / "SegmentationClass" / "00000.png"))
    b = np.asarray(Image.open(strict.out / "SegmentationClass" / "00000.png"))
    assert (a > 0).sum() > (b > 0).sum()
