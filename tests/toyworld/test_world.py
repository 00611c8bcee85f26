"""Toy world: determinism, captions, masks and mask recovery from images."""

from __future__ import annotations

import numpy as np
import pytest

from ovstore.toyworld.probe import topk_iou
from ovstore.toyworld.world import (
    BACKGROUND,
    COLORS,
    MIN_GAP,
    PALETTE,
    SHAPES,
    ToyObject,
    classify_pixels,
    parse_caption,
    recover_masks,
    render_scene,
    sample_scene,
    sample_scenes,
)


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(123, 200)


def test_same_seed_same_scenes():
    a, b = sample_scenes(7, 20), sample_scenes(7, 20)
    for x, y in zip(a, b):
        assert x.caption == y.caption
        assert np.array_equal(x.image, y.image)
        assert np.array_equal(x.object_masks, y.object_masks)
    c = sample_scenes(8, 20)
    assert any(x.caption != y.caption or not np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_generator_and_int_seed_agree():
    assert sample_scene(5).caption == sample_scene(np.random.default_rng(5)).caption


def test_caption_names_drawn_objects(scenes):
    counts = set()
    for s in scenes:
        counts.add(len(s.objects))
        assert 1 <= len(s.objects) <= 3
        assert parse_caption(s.caption) == [(o.color, o.shape) for o in s.objects]
        assert s.caption == " and ".join(f"a {o.color} {o.shape}" for o in s.objects)
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
    assert counts == {1, 2, 3}


def test_image_is_flat_palette_colours(scenes):
    allowed = {BACKGROUND, *PALETTE.values()}
    for s in scenes[:50]:
        assert {tuple(int(v) for v in px) for px in s.image.reshape(-1, 3)} <= allowed


def test_object_masks_match_colours_and_do_not_overlap(scenes):
    for s in scenes:
        assert s.object_masks.sum(0).max() <= 1
        for obj, mask in zip(s.objects, s.object_masks):
            assert mask.sum() > 0
            assert (s.image[mask] == PALETTE[obj.color]).all()
        background = ~s.object_masks.any(0)
        assert (s.image[background] == BACKGROUND).all()


def test_objects_keep_their_gap(scenes):
    for s in scenes:
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                assert (a.x + a.size + MIN_GAP <= b.x or b.x + b.size + MIN_GAP <= a.x
                        or a.y + a.size + MIN_GAP <= b.y or b.y + b.size + MIN_GAP <= a.y)


def test_word_masks_are_unions_by_word(scenes):
    for s in scenes:
        wm = s.word_masks()
        assert set(wm) == {o.color for o in s.objects} | {o.shape for o in s.objects}
        for word, mask in wm.items():
            expected = np.zeros_like(mask)
            for obj, m in zip(s.objects, s.object_masks):
                if word in (obj.color, obj.shape):
                    expected |= m
            assert np.array_equal(mask, expected)
        for color in {o.color for o in s.objects}:
            assert np.array_equal(wm[color], (s.image == PALETTE[color]).all(-1))


def test_recover_masks_on_rendered_scenes_is_exact(scenes):
    for s in scenes:
        rec, true = recover_masks(s.image, s.caption), s.word_masks()
        assert rec.keys() == true.keys()
        for word in true:
            assert np.array_equal(rec[word], true[word]), (s.caption, word)


def test_recover_masks_splits_shared_colour_by_shape():
    objs = [ToyObject("red", "circle", 1, 1, 11), ToyObject("red", "square", 18, 2, 9),
            ToyObject("red", "triangle", 5, 18, 12)]
    s = render_scene(objs)
    rec = recover_masks(s.image, s.caption)
    for i, shape in enumerate(("circle", "square", "triangle")):
        assert np.array_equal(rec[shape], s.object_masks[i])
    assert np.array_equal(rec["red"], s.object_masks.any(0))


def test_classify_pixels_tolerates_noise(scenes):
    rng = np.random.default_rng(0)
    for s in scenes[:20]:
        noisy = np.clip(s.image.astype(int) + rng.integers(-40, 41, s.image.shape), 0, 255).astype(np.uint8)
        labels = classify_pixels(noisy)
        expected = np.zeros(labels.shape, dtype=np.int64)
        for obj, m in zip(s.objects, s.object_masks):
            expected[m] = COLORS.index(obj.color) + 1
        assert np.array_equal(labels, expected)


def test_every_shape_renders_at_every_size():
    for size in range(5, 20):
        for shape in SHAPES:
            s = render_scene([ToyObject("blue", shape, 3, 3, size)])
            assert s.object_masks[0].sum() > 0
            assert recover_masks(s.image, s.caption)[shape].sum() == s.object_masks[0].sum()


def test_parse_caption_rejects_unknown_words():
    with pytest.raises(ValueError):
        parse_caption("a purple circle")


def test_topk_iou():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    score = mask.astype(float)
    assert topk_iou(score, mask) == 1.0
    assert topk_iou(-score, mask) == 0.0
    assert np.isnan(topk_iou(score, np.zeros_like(mask)))
