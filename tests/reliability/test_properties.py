"""Property-based tests: the store round-trips whatever it is given, and maps keep their
invariant (token maps sum to steps x heads x layers per pixel under the default aggregation)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovstore.analyze.engine import TokenBuckets, combine_layers, layer_keys, layer_token_maps, prepare_queries
from ovstore.store import ImageRecord, LayerInfo, ModelIdentity, StoreLayout, StoreWriter, open_store

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.builds(ImageRecord, prompt=text.filter(str.strip), negative_prompt=text,
                                  seed=st.integers(0, 2**63 - 1), guidance=st.floats(0, 30),
                                  num_inference_steps=st.integers(1, 1000)), min_size=1, max_size=4),
       heads=st.integers(1, 3), size=st.tuples(st.integers(1, 5), st.integers(1, 5)), steps=st.integers(1, 3),
       dtype=st.sampled_from(["float16", "float32"]), data=st.data())
def test_store_round_trip(tmp_path_factory, records, heads, size, steps, dtype, data):
    layer = LayerInfo(name="up_blocks.0.attentions.0.transformer_blocks.0.attn2", block="up", level=0,
                      height=size[0], width=size[1], heads=heads, head_dim=4, scale=0.5, key_input_dim=6)
    layout = StoreLayout(model=ModelIdentity(id="m", source="local", pipeline_class="P", text_encoder_hidden_size=6),
                         layers=(layer,), height=8, width=8, latent_height=size[0], latent_width=size[1],
                         branches=("uncond",), num_unet_calls=steps, calls=tuple(range(steps)), query_dtype=dtype)
    path = tmp_path_factory.mktemp("prop") / "s.zarr"
    writer = StoreWriter.open(path, layout)
    weight = data.draw(st.lists(st.floats(-2, 2, width=32), min_size=heads * 4 * 6, max_size=heads * 4 * 6))
    writer.write_key_projections({layer.name: (np.asarray(weight, np.float32).reshape(heads * 4, 6), None)})
    slots = writer.reserve(records)
    rng = np.random.default_rng(len(records))
    written = {}
    for slot in slots[::2]:  # every other image completes
        q = rng.standard_normal((1, steps, heads, *size, 4)).astype(dtype)
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        writer.write_image(slot, image=image, queries={layer.name: q}, timesteps=np.arange(steps, dtype=float),
                           branch_labels=("uncond",))
        writer.mark_complete(slot)
        written[slot] = (q, image)
    store = open_store(path)
    assert store.layout == layout
    assert store.complete_images() == sorted(written)
    assert store.incomplete_images() == [s for s in slots if s not in written]
    for slot, record in zip(slots, records):
        assert store.record(slot) == record
    for slot, (q, image) in written.items():
        np.testing.assert_array_equal(store.queries(layer.name, slot), q[0])
        np.testing.assert_array_equal(store.image(slot), image)
    np.testing.assert_array_equal(store.key_projection(layer.name)[0],
                                  np.asarray(weight, np.float32).reshape(heads * 4, 6))


def test_nul_characters_are_refused():
    import pytest

    from ovstore.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="NUL"):
        ImageRecord(prompt="a cat\x00")


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(2, 9), min_size=1, max_size=6), steps=st.integers(1, 4),
       shapes=st.lists(st.tuples(st.integers(1, 4), st.sampled_from([2, 4])), min_size=1, max_size=3),
       magnitude=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 1000))
def test_token_maps_sum_to_steps_heads_layers(lengths, steps, shapes, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = list(np.cumsum([0, *lengths]))
    embedding = torch.randn(offsets[-1], 8, generator=g)
    buckets = TokenBuckets.from_offsets(offsets)
    layers, per_layer = [], {}
    for k, (heads, level) in enumerate(shapes):
        side = 8 // level
        info = LayerInfo(name=f"l{k}", block="up", level=level, height=side, width=side, heads=heads,
                         head_dim=3, scale=3 ** -0.5, key_input_dim=8)
        keys = layer_keys(embedding, torch.randn(heads * 3, 8, generator=g), None, info)
        queries = torch.randn(steps, heads, side * side, 3, generator=g) * magnitude
        per_layer[info.name] = layer_token_maps(prepare_queries(queries), keys, buckets, memory_budget=2000)
        layers.append(info)
    maps = combine_layers(per_layer, layers, (8, 8))
    expected = steps * sum(h for h, _ in shapes)
    for a, b in zip(offsets[:-1], offsets[1:]):
        torch.testing.assert_close(maps[a:b].sum(0), torch.full((8, 8), float(expected)), rtol=1e-4, atol=1e-3)
        assert (maps[a:b] >= 0).all()
