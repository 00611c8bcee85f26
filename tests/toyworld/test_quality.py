"""Quality floors of the embedded toy-world (v2) model: a test-sized version of
``benchmarks/bench_toyworld.py`` (BENCHMARKS.md, "Toy world v2: quality").

24 held-out world-v2 captions (8 each with 1, 2 and 3 objects, a caption stream neither the
benchmark's sets nor training use) are captured with ``ovstore capture``; ground truth is recovered
from the generated images. Each floor lies below the benchmark's lowest figure over its
test-sized subsets (same size as this set) and above the figure's baselines, so the test fails
on a model whose maps do not localise. The margins are in the comments, as measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ovstore.label import LabelConfig, evaluate_dirs, label_store
from ovstore.label.voc import write_label_tree
from ovstore.toyworld import quality as q


def class_norm_maps(store, images, config, text_encoder=None):
    """Normalised class maps ``(image, class, H, W)`` exactly as ``ovstore label`` makes them."""
    from ovstore.analyze import load_text_encoder
    from ovstore.label.class_maps import label_class_maps

    text_encoder = text_encoder or load_text_encoder(store.layout.model)
    return label_class_maps(store, list(images), config, text_encoder, size=(store.layout.height, store.layout.width))


DEFAULTS = Path(q.__file__).resolve().parents[1] / "data" / "toy-shapes" / "ovstore_defaults.json"
CLASSES = ("circle", "square", "triangle")
#: The reference protocol's threshold, chosen on the benchmark's calibration set.
BARE_THRESHOLD = 0.3


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    scenes = q.quality_scenes(3, 8)
    store = q.capture_captions([s.caption for s in scenes], tmp_path_factory.mktemp("toy-v2") / "toy.zarr",
                               seed=3000, batch_size=12)
    images = store.complete_images()
    assert len(images) == 24
    return store, images, {i: q.image_truth(store, i) for i in images}


def test_prompt_words_find_their_own_objects(toy):
    store, images, truth = toy
    s = q.prompt_word_quality(store, images, truth)
    assert len(s.instances["map"]) >= 60 and s.rate("binding")[1] >= 20 and s.rate("inside")[1] >= 25
    # benchmark: top-k 0.716 over 96 images, 0.678 .. 0.768 over its 4 test-sized subsets (this set: 0.648);
    # flat 0.09, object oracle 0.53; binding 0.957 .. 1.000 (0.973 here); inside 1.000 (1.00 here)
    assert s.miou() >= 0.60, s.miou()
    assert s.miou() >= 5 * s.miou("flat") and s.miou() > s.miou("objects")
    assert s.rate("binding")[0] >= 0.95  # flat and object oracle: 0.5
    assert s.rate("inside")[0] >= 0.95  # flat: 0.5


def test_bare_attribution_reference_protocol(toy):
    store, images, truth = toy
    rows = q.bare_rows(store, images, truth)
    assert len(rows) >= 25
    iou = q.bare_iou(rows, BARE_THRESHOLD)
    base = q.bare_baselines(rows)
    # benchmark, 1-3 objects: 0.527, subsets 0.502 .. 0.546 (this set: 0.573); flat 0.13, object oracle 0.61.
    # Two-object images alone spread more at this size (0.516 .. 0.581).
    assert iou >= 0.47, iou
    assert iou >= 3.5 * base["flat"], (iou, base)


def test_synonyms_and_hypernyms_not_in_the_prompt(toy):
    store, images, truth = toy
    s = q.open_vocabulary_quality(store, images, truth)["synonyms + hypernyms"]
    assert len(s.instances["map"]) >= 30
    # benchmark: 0.585 (5.4x flat), subsets 0.539 .. 0.597 (this set: 0.602, 6.3x flat)
    assert s.miou() >= 0.52, s.miou()
    assert s.miou() >= 5 * s.miou("flat")


def _label(store, images, truth, config, out: Path) -> float:
    gt = write_label_tree(out / "gt", CLASSES, {i: q.label_truth(truth[i]) for i in images})
    label_store(store, out / "labels", config, images=images, scheduler="synchronous", partition_size=32)
    return evaluate_dirs(out / "labels", gt).miou


def test_label_with_the_models_defaults(toy, tmp_path):
    store, images, truth = toy
    settings = json.loads(DEFAULTS.read_text())
    assert settings["format"] == 1
    config = LabelConfig(classes=CLASSES, **settings["label"])
    miou = _label(store, images, truth, config, tmp_path)
    base = q.label_baselines(images, truth, config)
    package = LabelConfig(classes=CLASSES)
    package_miou = q.label_miou(class_norm_maps(store, images, package, None), images, truth, package)
    # benchmark (maps from each image's prompt, class words): 0.821 over 93 images, subsets 0.774 .. 0.847
    # (this set: 0.802); flat 0.14, object oracle 0.26; package defaults 0.281 (0.265 here)
    assert settings["label"].get("maps_from") == "prompt"
    assert miou >= 0.70, miou
    assert miou > base["flat"] + 0.55, (miou, base)
    assert miou > package_miou + 0.45, (miou, package_miou)


def test_tokens_learned_on_one_image_localise_on_held_out_images(toy):
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens, token_attribution

    store, images, truth = toy
    tasks = []
    for shape in CLASSES:
        first = next(i for i in images if truth[i].masks.get(shape, np.zeros(1)).sum() >= 10)
        tasks.append(TokenTask(shape, (first,), (truth[first].masks[shape],)))
    tokens = optimize_tokens(store, tasks, config=OptimizeConfig(epochs=100))
    learned, plain = q.IoUSums(1), q.IoUSums(2)
    for task, token in zip(tasks, tokens):
        held = [i for i in images if i not in task.images and truth[i].masks.get(token.name, np.zeros(1)).sum() >= 3]
        maps = compute_maps(store, [token_attribution(token, store.layout.model), f"a {token.name}"],
                            images=held, config=MapConfig(size=(32, 32)))
        word = int(np.flatnonzero(maps["token_str"].values == f"{token.name}</w>")[0])
        for row, i in enumerate(held):
            learned.add(token.name, maps.values[row, 1], truth[i].masks[token.name], truth[i].objects)
            plain.add(token.name, maps.values[row, word], truth[i].masks[token.name], truth[i].objects)
    assert len(learned.instances["map"]) >= 15
    # benchmark (300 epochs): tokens 0.461 vs the word 0.492 on 122 held-out instances (flat 0.093); here
    # (100 epochs) 0.379 vs 0.452. On this model a token from one image is below the word: no floor above it
    assert learned.miou() >= 3 * learned.miou("flat"), (learned.miou(), learned.miou("flat"))
    assert learned.miou() >= plain.miou() - 0.10, (learned.miou(), plain.miou())
