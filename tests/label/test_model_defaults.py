"""Analysis defaults carried by a model directory (``ovstore_defaults.json``): read and checked at
capture, recorded in the store, used by ``label`` (provenance names each setting's source) and by
``maps --png`` unless the user says otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovstore.errors import InvalidInputError
from ovstore.label import OVSTORE_DEFAULTS, LabelConfig, label_config, label_store
from ovstore.model_defaults import DEFAULTS_FILE, parse_model_defaults, read_model_defaults
from ovstore.store import AnalysisDefaults, analysis_defaults, open_store

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = DATA / "golden" / "tiny-sd15"
V1 = DATA / "v1-store"
CLASSES = "cat,sofa,car"
DEFAULTS = {"format": 1,
            "label": {"prompt_template": "a {}", "mode": "compete", "normalize": "max", "threshold": 0.45},
            "maps": {"normalize": "minmax"}}


def _model_with(root: Path, defaults) -> Path:
    """tiny-sd15 copied to ``root`` with ``defaults`` (a dict, or raw text) as its defaults file."""
    shutil.copytree(TINY, root)
    text = defaults if isinstance(defaults, str) else json.dumps(defaults)
    (root / DEFAULTS_FILE).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _model_with(tmp_path_factory.mktemp("model") / "tiny-with-defaults", DEFAULTS)


@pytest.fixture(scope="module")
def defaults_store(model_dir, tmp_path_factory):
    """Two images of the model with defaults, the prompts and seeds of ``plain_store``."""
    from ovstore.capture import run_capture

    out = tmp_path_factory.mktemp("captured") / "with-defaults.zarr"
    run_capture(str(model_dir), prompts=["a cat on a sofa", "a red car"], seed=3, steps=3, out=out)
    return out


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory, tiny_pipe):
    """The same two images of the same model without a defaults file (tiny-sd15 itself)."""
    from ovstore.capture import run_capture

    out = tmp_path_factory.mktemp("captured") / "plain.zarr"
    pipe, identity = tiny_pipe
    assert identity.analysis_defaults is None
    run_capture(pipe=pipe, identity=identity, prompts=["a cat on a sofa", "a red car"], seed=3, steps=3, out=out)
    return out


def _labels(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((out / "SegmentationClass").glob("*.png"))])


def _provenance(out: Path) -> tuple[dict, list[dict]]:
    coco = json.loads((out / "annotations.json").read_text())
    return coco["info"], [image["ovstore"] for image in coco["images"]]


def _sources(settings: dict) -> dict[str, str]:
    return {name: entry["source"] for name, entry in settings.items()}


def test_capture_records_the_defaults_in_the_store(defaults_store, plain_store, model_dir):
    recorded = analysis_defaults(open_store(defaults_store))
    assert recorded.label == DEFAULTS["label"] and recorded.maps == DEFAULTS["maps"]
    assert recorded.file == str((model_dir / DEFAULTS_FILE).resolve())
    import hashlib

    assert recorded.sha256 == hashlib.sha256((model_dir / DEFAULTS_FILE).read_bytes()).hexdigest()
    meta = json.loads((defaults_store / "zarr.json").read_text())["attributes"]["ovstore"]
    assert meta["layout"]["model"]["analysis_defaults"]["label"]["threshold"] == 0.45
    # a model without the file: no defaults, and the layout record is what it always was
    plain = json.loads((plain_store / "zarr.json").read_text())["attributes"]["ovstore"]
    assert "analysis_defaults" not in plain["layout"]["model"]
    assert analysis_defaults(open_store(plain_store)).empty
    # the same queries: the file changes the analysis defaults, never the capture
    a, b = open_store(defaults_store), open_store(plain_store)
    layer = a.layers[0].name
    np.testing.assert_array_equal(a.queries(layer, 0), b.queries(layer, 0))


def test_label_uses_the_model_defaults_and_records_their_source(defaults_store, tmp_path):
    result = label_store(defaults_store, tmp_path / "model", label_config(classes=CLASSES), scheduler="synchronous")
    assert result.labelled == (0, 1)
    info, images = _provenance(tmp_path / "model")
    for settings in [info["settings"], *(i["settings"] for i in images)]:
        for name, value in DEFAULTS["label"].items():
            assert settings[name] == {"value": value, "source": "model"}, name
        assert settings["adaptive"] == {"value": False, "source": "ovstore"}
        assert set(_sources(settings)) == set(OVSTORE_DEFAULTS)
    assert all(i["normalize"] == "max" and i["mode"] == "compete" for i in images)
    assert all(i["thresholds"]["cat"] == 0.45 for i in images)
    assert all(i["model_defaults"] == analysis_defaults(open_store(defaults_store)).file for i in images)
    # the same labels as the user giving those values, who is then their source
    given = LabelConfig(classes=tuple(CLASSES.split(",")), **DEFAULTS["label"])
    label_store(defaults_store, tmp_path / "user", given, scheduler="synchronous")
    np.testing.assert_array_equal(_labels(tmp_path / "model"), _labels(tmp_path / "user"))
    _, user_images = _provenance(tmp_path / "user")
    assert {_sources(i["settings"])[k] for i in user_images for k in DEFAULTS["label"]} == {"user"}
    assert all(i["model_defaults"] is None for i in user_images)
    # and not the labels of ovstore's own defaults
    label_store(defaults_store, tmp_path / "ovstore", LabelConfig(classes=tuple(CLASSES.split(","))),
                scheduler="synchronous", model_defaults=False)
    assert not np.array_equal(_labels(tmp_path / "model"), _labels(tmp_path / "ovstore"))


def test_user_options_override_the_model_defaults(defaults_store, tmp_path, capsys):
    from ovstore.cli import main

    out = tmp_path / "out"
    _run(main, "label", str(defaults_store), "--classes", CLASSES, "--out", str(out), "--scheduler", "synchronous",
         "--threshold", "0.7", "--mode", "separate")
    err = capsys.readouterr().err
    assert "model defaults (" in err and "prompt_template 'a {}'" in err and "threshold" not in err.split("):")[1]
    info, images = _provenance(out)
    assert info["settings"]["threshold"] == {"value": 0.7, "source": "user"}
    assert info["settings"]["mode"] == {"value": "separate", "source": "user"}
    assert info["settings"]["normalize"] == {"value": "max", "source": "model"}
    assert info["settings"]["min_component"] == {"value": 0, "source": "ovstore"}
    assert all(i["thresholds"]["sofa"] == 0.7 for i in images)
    # a switch the model does not set, turned off explicitly: the user's
    out2 = tmp_path / "out2"
    _run(main, "label", str(defaults_store), "--classes", CLASSES, "--out", str(out2), "--scheduler", "synchronous",
         "--no-adaptive", "--all-classes")
    info2, _ = _provenance(out2)
    assert info2["settings"]["adaptive"] == {"value": False, "source": "user"}
    assert info2["settings"]["prompt_classes_only"] == {"value": False, "source": "user"}


def test_no_model_defaults_gives_ovstores_defaults(defaults_store, plain_store, tmp_path):
    from ovstore.cli import main

    _run(main, "label", str(defaults_store), "--classes", CLASSES, "--out", str(tmp_path / "ignored"),
         "--scheduler", "synchronous", "--no-model-defaults")
    info, images = _provenance(tmp_path / "ignored")
    assert set(_sources(info["settings"]).values()) == {"ovstore"}
    assert {k: v["value"] for k, v in info["settings"].items()} == {
        **OVSTORE_DEFAULTS, "sweep": list(OVSTORE_DEFAULTS["sweep"])}
    assert all(i["model_defaults"] is None and i["thresholds"]["cat"] == 0.6 for i in images)
    # the same labels as the same images of the model without a defaults file
    _run(main, "label", str(plain_store), "--classes", CLASSES, "--out", str(tmp_path / "plain"),
         "--scheduler", "synchronous")
    np.testing.assert_array_equal(_labels(tmp_path / "ignored"), _labels(tmp_path / "plain"))
    plain_info, _ = _provenance(tmp_path / "plain")
    assert plain_info["settings"] == info["settings"]


def test_a_model_without_the_file_keeps_todays_defaults(plain_store):
    opened = open_store(plain_store)
    config = LabelConfig(classes=("cat",)).with_model_defaults(analysis_defaults(opened))
    assert config == LabelConfig(classes=("cat",), prompt_template="a photograph of a {}", mode="separate",
                                 normalize="minmax", threshold=0.6)
    assert set(config.sources.values()) == {"ovstore"}


def test_a_v1_store_labels_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(DATA.parent.parent)  # the v1 store names its model by a path relative to the repository
    store = V1 / "store.zarr"
    assert analysis_defaults(open_store(store)).empty
    label_store(store, tmp_path / "v1", LabelConfig(classes=("cat", "sofa", "car")), scheduler="synchronous")
    np.testing.assert_array_equal(_labels(tmp_path / "v1"), np.load(V1 / "labels.npz")["labels"])
    info, _ = _provenance(tmp_path / "v1")
    assert set(_sources(info["settings"]).values()) == {"ovstore"}


def test_the_python_api_applies_them_once(defaults_store):
    opened = open_store(defaults_store)
    defaults = analysis_defaults(opened)
    config = LabelConfig(classes=("cat",), threshold=0.3).with_model_defaults(defaults)
    assert (config.threshold, config.normalize, config.mode) == (0.3, "max", "compete")
    assert config.with_model_defaults(defaults) == config
    assert config.with_model_defaults(defaults).sources == config.sources
    # a sweep needs adaptive: from the user or from the model
    with pytest.raises(InvalidInputError, match="add --adaptive"):
        label_config(classes="cat", sweep="0.3:0.6:0.1", defaults=defaults)
    adaptive = AnalysisDefaults(label={"adaptive": True})
    assert label_config(classes="cat", sweep="0.3:0.6:0.1", defaults=adaptive).sweep == (0.3, 0.4, 0.5, 0.6)


def test_maps_png_uses_the_display_default(defaults_store, tmp_path):
    from ovstore.analyze import compute_maps, display_maps, display_normalization
    from ovstore.cli import main

    opened = open_store(defaults_store)
    assert display_normalization(opened) == ("minmax", "model")
    assert display_normalization(opened, "max") == ("max", "user")
    assert display_normalization(opened, model_defaults=False) == (None, "ovstore")
    assert display_normalization(open_store(V1 / "store.zarr")) == (None, "ovstore")
    with pytest.raises(InvalidInputError, match="not one of max, minmax"):
        display_normalization(opened, "none")
    maps = compute_maps(opened, ["a cat and a sofa"])
    shown = display_maps(maps, opened).values
    assert np.allclose(shown.min(axis=(2, 3)), 0) and np.allclose(shown.max(axis=(2, 3)), 1)
    raw = maps.values
    assert display_maps(maps, opened, model_defaults=False) is maps  # no normalisation: drawn as computed
    np.testing.assert_allclose(display_maps(maps, opened, "max").values,
                               raw / raw.max(axis=(2, 3), keepdims=True), rtol=1e-6)
    # the command: the model's minmax unless --normalize says otherwise
    _run(main, "maps", str(defaults_store), "-a", "a cat and a sofa", "--image", "0", "--out", str(tmp_path / "m.npy"),
         "--png", str(tmp_path / "model"))
    _run(main, "maps", str(defaults_store), "-a", "a cat and a sofa", "--image", "0", "--out", str(tmp_path / "u.npy"),
         "--png", str(tmp_path / "user"), "--normalize", "max")
    name = "00000_p000_t02_cat.png"
    model_png = np.asarray(Image.open(tmp_path / "model" / name), np.int16)
    user_png = np.asarray(Image.open(tmp_path / "user" / name), np.int16)
    assert np.abs(model_png - user_png).max() > 20  # the floor stretched to 0 shows a different picture


def _run(main, *args):
    import sys

    old = sys.argv
    sys.argv = ["ovstore", *args]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, f"exit {exc.code}"
    finally:
        sys.argv = old


# --- the file itself -------------------------------------------------------------------------

BAD_FILES = [
    ("unknown top-level key", {"format": 1, "labels": {}}, "unknown key 'labels'"),
    ("missing format", {"label": {}}, '"format" is missing'),
    ("format of a newer ovstore", {"format": 2}, '"format" is 2; this ovstore reads format 1'),
    ("label not an object", {"format": 1, "label": [0.4]}, "label is [0.4], not a JSON object"),
    ("unknown label key", {"format": 1, "label": {"treshold": 0.4}}, "label.treshold: unknown key"),
    ("threshold out of range", {"format": 1, "label": {"threshold": 1.5}}, "label.threshold is 1.5; thresholds lie between 0 and 1"),
    ("threshold as a string", {"format": 1, "label": {"threshold": "0.4"}}, 'label.threshold is "0.4", not a number'),
    ("threshold as a boolean", {"format": 1, "label": {"threshold": True}}, "label.threshold is true, not a number"),
    ("unknown mode", {"format": 1, "label": {"mode": "joint"}}, 'label.mode is "joint", not one of separate, compete'),
    ("normalize none", {"format": 1, "label": {"normalize": "none"}}, 'label.normalize is "none", not one of minmax, max'),
    ("template without {}", {"format": 1, "label": {"prompt_template": "a cat"}}, "which has no {} for the class word"),
    ("switch as a string", {"format": 1, "label": {"crf": "yes"}}, 'label.crf is "yes", not true or false'),
    ("negative min_component", {"format": 1, "label": {"min_component": -1}}, "label.min_component is -1"),
    ("sweep of one value", {"format": 1, "label": {"sweep": [0.5, 0.5]}}, "at least two different thresholds"),
    ("sweep not a list", {"format": 1, "label": {"sweep": "0.3:0.9:0.1"}}, "label.sweep is \"0.3:0.9:0.1\", not a list"),
    ("classes in the model's file", {"format": 1, "label": {"classes": ["cat"]}}, "label.classes belongs to one labelling"),
    ("unknown maps key", {"format": 1, "maps": {"cmap": "jet"}}, "unknown key maps.cmap"),
    ("display normalisation none", {"format": 1, "maps": {"normalize": "none"}}, 'maps.normalize is "none", not one of max, minmax'),
    ("not an object", [1], "must hold a JSON object"),
    ("class words not lists", {"format": 1, "label": {"class_words": {"dog": "puppy"}}}, "label.class_words is"),
    ("class words empty", {"format": 1, "label": {"class_words": {"dog": []}}}, "write an object of class -> list"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_defaults_files_are_refused_naming_file_and_key(data, message):
    with pytest.raises(InvalidInputError) as info:
        parse_model_defaults(data, "models/x/ovstore_defaults.json")
    text = str(info.value)
    assert message in text and text.startswith("models/x/ovstore_defaults.json") and "\n" not in text


def test_good_defaults_files_are_read_whole(tmp_path):
    full = {"format": 1, "label": {"prompt_template": "a red {}", "mode": "separate", "normalize": "minmax",
                                   "threshold": 0.5, "adaptive": True, "sweep": [0.4, 0.5, 0.6], "crf": False,
                                   "min_component": 4, "prompt_classes_only": True},
            "maps": {"normalize": "max"}}
    parsed = parse_model_defaults(full, "f")
    assert parsed.label == full["label"] and parsed.maps == full["maps"]
    assert parse_model_defaults({"format": 1}, "f").empty
    (tmp_path / DEFAULTS_FILE).write_text("\ufeff" + json.dumps(full), encoding="utf-8")  # a BOM is fine
    assert read_model_defaults(tmp_path).label["threshold"] == 0.5
    assert read_model_defaults(tmp_path / "nothing-here") is None
    config = LabelConfig(classes=("cat",)).with_model_defaults(parsed)
    assert config.sweep == (0.4, 0.5, 0.6) and config.adaptive and config.min_component == 4


def test_the_models_class_words_apply_to_the_classes_labelled():
    parsed = parse_model_defaults({"format": 1, "label": {"class_words": {"circle": ["ball"], "cat": ["kitten"]}}},
                                  "f")
    config = LabelConfig(classes=("circle", "square")).with_model_defaults(parsed)
    assert config.class_words == {"circle": ("ball",)} and config.sources["class_words"] == "model"
    assert LabelConfig(classes=("square",)).with_model_defaults(parsed).sources["class_words"] == "ovstore"
    mine = LabelConfig(classes=("circle",), class_words={"circle": ["disc"]}).with_model_defaults(parsed)
    assert mine.class_words == {"circle": ("disc",)} and mine.sources["class_words"] == "user"


def test_a_bad_file_stops_capture_before_anything_is_written(tmp_path, capsys):
    from ovstore.cli import main

    model = _model_with(tmp_path / "model", '{"format": 1, "label": {"threshold": 0.4,}}')
    with pytest.raises(SystemExit) as exit_info:
        import sys

        old, sys.argv = sys.argv, ["ovstore", "capture", str(model), "--prompt", "a cat", "--steps", "2",
                                   "--out", str(tmp_path / "caps.zarr")]
        try:
            main()
        finally:
            sys.argv = old
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{(model / DEFAULTS_FILE).resolve()} is not valid JSON (line 1" in err and "fix the file" in err
    assert not (tmp_path / "caps.zarr").exists()
    from ovstore.capture import load_pipeline

    (model / DEFAULTS_FILE).write_text('{"format": 1, "label": {"threshold": 4}}')
    with pytest.raises(InvalidInputError, match=r"ovstore_defaults.json: label.threshold is 4; thresholds lie"):
        load_pipeline(str(model))


def test_hub_ids_use_the_cache_and_offline_means_none(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert read_model_defaults("someone/some-model", source="hub") is None  # offline, nothing cached
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / DEFAULTS_FILE).write_text(json.dumps(DEFAULTS))
    found = read_model_defaults("someone/some-model", source="hub")
    assert found.label == DEFAULTS["label"] and found.file == f"someone/some-model/{DEFAULTS_FILE}"
    assert read_model_defaults("someone/some-model", source="hub", revision=commit).maps == DEFAULTS["maps"]
    (snapshot / DEFAULTS_FILE).write_text(json.dumps({"format": 1, "maps": {"normalize": "sqrt"}}))
    with pytest.raises(InvalidInputError, match=f"someone/some-model/{DEFAULTS_FILE}: maps.normalize"):
        read_model_defaults("someone/some-model", source="hub")
