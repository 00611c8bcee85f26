"""The training script's v2 recipe: augmented captions name the right objects, stay out of
the held-out split, and the unpadded context mask really hides the padding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ovstore.toyworld.world import is_held_out_caption, sample_rich_scene  # noqa: E402


@pytest.fixture(scope="module")
def train():
    script = Path(__file__).resolve().parents[2] / "scripts" / "train_toyworld.py"
    spec = importlib.util.spec_from_file_location("train_toyworld_recipe", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scenes(n: int) -> list:
    return [sample_rich_scene(np.random.default_rng([3, i]), split="train") for i in range(n)]


def test_plain_captions_are_unchanged(train):
    rng = np.random.default_rng(0)
    for scene in _scenes(50):
        words = train.training_words(scene, rng, 0.0, 0.0)
        assert train.words_caption(words) == scene.caption
        named = {i for _, i in words if i is not None}
        assert named == set(range(len(scene.objects)))


def test_augmented_captions_name_their_objects_and_stay_out_of_the_held_out_split(train):
    rng = np.random.default_rng(1)
    lists = partial = 0
    for scene in _scenes(400):
        words = train.training_words(scene, rng, 0.5, 0.5)
        caption = train.words_caption(words)
        assert not is_held_out_caption(caption)
        named = {i for _, i in words if i is not None}
        for w, i in words:
            if i is not None:
                obj = scene.objects[i]
                assert w in (obj.word, obj.color), (w, caption)
        for i in named:  # every object named keeps its noun
            assert (scene.objects[i].word, i) in words, caption
        assert named and named <= set(range(len(scene.objects)))
        lists += "a" not in caption.split()
        partial += len(named) < len(scene.objects)
    assert lists > 100 and partial > 50  # both augmentations happen at about their rates


def test_grounding_targets_point_at_the_caption_tokens(train):
    from ovstore.toyworld.model import build_toy_pipeline

    tok = build_toy_pipeline(seed=0, unet_channels=(16, 16, 16)).tokenizer
    scene = _scenes(1)[0]
    words = train.training_words(scene, np.random.default_rng(2), 1.0, 0.0)  # a bare word list
    targets = train.grounding_targets([words], [scene], tok, [True])
    ids = tok(train.words_caption(words)).input_ids
    for b, t, mask in targets:
        word = tok.decode([ids[t]]).strip()
        owners = [i for w, i in words if i is not None and w.startswith(word)]
        assert owners and any(np.array_equal(mask, scene.object_masks[i]) for i in owners)
    assert len(targets) == sum(i is not None for _, i in words)


def test_unpadded_context_hides_the_padding_from_unet_and_grounding(train):
    from ovstore.toyworld.model import build_toy_pipeline

    torch.manual_seed(0)
    pipe = build_toy_pipeline(seed=0, unet_channels=(16, 16, 16))
    unet, text, tok = pipe.unet.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    ids = tok(["a red circle", "a blue box next to a green wedge"], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    eot = (ids == tok.eos_token_id).int().argmax(1)
    keep = torch.arange(ids.shape[1])[None] <= eot[:, None]
    grounder = train.Grounder(unet)
    with torch.no_grad():
        emb = text(ids)[0]
        z = torch.randn(2, unet.config.in_channels, 16, 16)
        t = torch.tensor([10, 500])
        grounder.start(emb, keep)
        out = unet(z, t, emb, encoder_attention_mask=keep).sample
        probs = list(grounder.probs)
        grounder.start(None)  # hooks idle from here on
        other = emb.clone()
        other[~keep] = torch.randn_like(other[~keep]) * 5  # padding rows changed
        out2 = unet(z, t, other, encoder_attention_mask=keep).sample
        out3 = unet(z, t, other).sample
    assert torch.allclose(out, out2, atol=1e-5)  # masked rows are not seen
    assert not torch.allclose(out, out3, atol=1e-3)  # unmasked they are
    assert probs and all(float(p[~keep[:, None, :].expand_as(p)].abs().max()) < 1e-6 for p in probs)
    assert all(torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5) for p in probs)


def test_pixel_grounding_term_is_the_bce_of_a_words_attention_against_its_mask(train):
    """``--pixel-weight``: TokenCompose's L_pixel, per layer the binary cross-entropy of the
    target token's attention probability at each pixel against the mask pooled to that grid."""
    from ovstore.toyworld.model import build_toy_pipeline

    pipe = build_toy_pipeline(seed=0, unet_channels=(16, 16, 16))
    grounder = train.Grounder(pipe.unet)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 1:5] = True
    target = [(0, 2, mask)]
    pooled = torch.from_numpy(mask.astype(np.float32))[None, None]
    side4 = torch.nn.functional.adaptive_avg_pool2d(pooled, 4).flatten()
    gen = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(1, 64, 5, generator=gen), -1), torch.softmax(torch.randn(1, 16, 5, generator=gen), -1)]
    grounder.probs = [p.clone() for p in probs]
    token, pixel = grounder.losses(target)
    expected = torch.stack([
        torch.nn.functional.binary_cross_entropy(probs[0][0, :, 2], pooled.flatten()),
        torch.nn.functional.binary_cross_entropy(probs[1][0, :, 2], side4)]).mean()
    torch.testing.assert_close(pixel, expected, rtol=1e-5, atol=1e-6)
    outside = [1 - (p[0, :, 2] * m).sum() / p[0, :, 2].sum() for p, m in zip(probs, (pooled.flatten(), side4))]
    torch.testing.assert_close(token, torch.stack(outside).mean(), rtol=1e-5, atol=1e-6)
    # attention that is the mask scores lower than attention spread evenly
    exact = torch.zeros(1, 64, 5)
    exact[0, :, 2] = pooled.flatten().clamp(0.02, 0.98)
    exact[0, :, 0] = 1 - exact[0, :, 2]
    grounder.probs = [exact]
    assert grounder.losses(target)[1] < pixel
