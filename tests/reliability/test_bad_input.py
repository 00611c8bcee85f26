"""Every bad input gets a one-line error naming the problem and the fix, a non-zero exit
status, and no change to existing data (the table in docs/errors.md)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from ovstore.cli import main
from reliability_helpers import digest, run_cli

TINY = Path(__file__).resolve().parents[1] / "data" / "golden" / "tiny-sd15"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, multi_store, tiny_pipe):
    from ovstore.capture import CaptureConfig, build_requests, capture

    root = tmp_path_factory.mktemp("bad")
    capture(*tiny_pipe, build_requests([("a cat", None, 0)], num_inference_steps=2), root / "other_settings.zarr",
            config=CaptureConfig(num_inference_steps=2))
    store = root / "store.zarr"
    shutil.copytree(multi_store, store)
    (root / "empty_dir").mkdir()
    zarr.open_group(root / "plain.zarr", mode="w")
    future = root / "future.zarr"
    shutil.copytree(multi_store, future)
    group = zarr.open_group(future, mode="r+")
    group.attrs["ovstore"] = {**group.attrs["ovstore"], "format_version": 99}
    # a pipeline without cross-attention
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root / "ddpm")
    # a text encoder of another hidden size
    from transformers import CLIPTextConfig, CLIPTextModel

    other = root / "other-encoder"
    CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=20, num_attention_heads=2, num_hidden_layers=1,
                                 vocab_size=49408)).save_pretrained(other / "text_encoder")
    shutil.copytree(TINY / "tokenizer", other / "tokenizer")
    (other / "model_index.json").write_text("{}")
    # masks
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "empty_mask.png")
    (root / "broken_mask.png").write_bytes(b"\x89PNG broken")
    wide = np.zeros((32, 80), np.uint8)
    wide[:, :20] = 255
    Image.fromarray(wide).save(root / "wide_mask.png")
    good = np.zeros((64, 64), np.uint8)
    good[10:30, 10:30] = 255
    Image.fromarray(good).save(root / "mask.png")
    (root / "prompts.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": -3}\n')
    (root / "prompts_bad_json.jsonl").write_text('a cat\n{"prompt": "a dog",\n')
    (root / "a_file.txt").write_text("not a store\n")
    (root / "not_a_store").mkdir()
    (root / "not_a_store" / "notes.txt").write_text("unrelated data\n")
    from safetensors.torch import save_file

    save_file({"embedding": torch.zeros(4)}, str(root / "plain.safetensors"))
    (root / "pred").mkdir()
    (root / "gt").mkdir()
    Image.fromarray(good).save(root / "gt" / "00000.png")
    return root


CASES = [
    ("missing model path", ["capture", "{root}/no/such/model", "--prompt", "x", "--out", "{root}/o1.zarr"], "does not exist"),
    ("directory that is not a pipeline", ["capture", "{root}/empty_dir", "--prompt", "x", "--out", "{root}/o2.zarr"], "not a diffusers pipeline"),
    ("pipeline without cross-attention", ["capture", "{root}/ddpm", "--prompt", "x", "--out", "{root}/o3.zarr"], "UNet2DConditionModel"),
    ("not an ovstore store", ["info", "{root}/plain.zarr"], "not an ovstore store"),
    ("missing store", ["maps", "{root}/none.zarr", "-a", "cat"], "does not exist"),
    ("newer format version", ["info", "{root}/future.zarr"], "version 99"),
    ("text encoder of another hidden size", ["maps", "{store}", "-a", "cat", "--model", "{root}/other-encoder", "--out", "{root}/m.npy"], "channels but layer"),
    ("attribution longer than the encoder's limit", ["maps", "{store}", "-a", " ".join(["cat"] * 90), "--out", "{root}/m.npy"], "at most 77"),
    ("empty attribution prompt", ["maps", "{store}", "-a", "  ", "--out", "{root}/m.npy"], "empty"),
    ("unknown layer name", ["maps", "{store}", "-a", "cat", "--layer", "up_blocks.9*", "--out", "{root}/m.npy"], "matches no cross-attention layer"),
    ("unknown resolution", ["maps", "{store}", "-a", "cat", "--resolution", "7x7", "--out", "{root}/m.npy"], "no cross-attention layer has resolution 7x7"),
    ("step index out of range", ["maps", "{store}", "-a", "cat", "--steps", "50", "--out", "{root}/m.npy"], "out of range"),
    ("image index out of range", ["maps", "{store}", "-a", "cat", "--image", "99", "--out", "{root}/m.npy"], "out of range"),
    ("malformed step specification", ["maps", "{store}", "-a", "cat", "--steps", "1:x", "--out", "{root}/m.npy"], "not an integer"),
    ("empty mask", ["optimize", "{store}", "--image", "0", "--mask", "{root}/empty_mask.png", "--init", "cat", "--out", "{root}/t.safetensors"], "empty"),
    ("unreadable mask", ["optimize", "{store}", "--image", "0", "--mask", "{root}/broken_mask.png", "--init", "cat", "--out", "{root}/t.safetensors"], "not a readable image"),
    ("mask of another aspect ratio", ["optimize", "{store}", "--image", "0", "--mask", "{root}/wide_mask.png", "--init", "cat", "--out", "{root}/t.safetensors"], "aspect ratio"),
    ("mask count differs from image count", ["optimize", "{store}", "--image", "0", "--image", "1", "--mask", "{root}/mask.png", "--init", "cat", "--out", "{root}/t.safetensors"], "one --mask per --image"),
    ("prompts file with a bad value (line number)", ["capture", "--prompts-file", "{root}/prompts.jsonl", "--out", "{root}/o4.zarr"], "line 2"),
    ("prompts file with bad JSON (line number)", ["capture", "--prompts-file", "{root}/prompts_bad_json.jsonl", "--out", "{root}/o5.zarr"], "line 2"),
    ("conflicting flags: --resume with --reserve-only", ["capture", "--resume", "--reserve-only", "--out", "{store}"], "--reserve-only"),
    ("conflicting flags: --worker with prompts", ["capture", "--resume", "--worker", "0/2", "--prompt", "x", "--out", "{store}"], "--reserve-only"),
    ("--worker out of range", ["capture", "--resume", "--worker", "3/2", "--out", "{store}"], "0 <= K < N"),
    ("--resume of a store that does not exist", ["capture", "--resume", "--out", "{root}/typo.zarr"], "nothing to resume"),
    ("--out is a file", ["capture", "--prompt", "x", "--out", "{root}/a_file.txt"], "is a file"),
    ("--out is a directory that is not a store", ["capture", "--prompt", "x", "--out", "{root}/not_a_store"], "not an ovstore store"),
    ("--prompts-file is a directory", ["capture", "--prompts-file", "{root}/empty_dir", "--out", "{root}/o9.zarr"], "is a directory"),
    ("appending with other settings", ["capture", "--prompt", "x", "--steps", "2", "--out", "{store}"], "Leave those options out"),
    ("appending with another model", ["capture", "ovstore/toy-shapes", "--prompt", "x", "--out", "{store}"], "text-encoder weights differ"),
    ("resuming with another model", ["capture", "ovstore/toy-shapes", "--resume", "--prompt", "x", "--out", "{store}"], "cannot resume"),
    ("merging stores of other settings", ["merge", "--out", "{root}/merged.zarr", "{store}", "{root}/other_settings.zarr"], "cannot merge"),
    ("merging into a source", ["merge", "--out", "{store}", "{store}"], "must differ"),
    ("images --out is a file", ["images", "{store}", "--out", "{root}/a_file.txt"], "is a file"),
    ("not an ovstore token", ["maps", "{store}", "--token", "{root}/plain.safetensors", "--out", "{root}/m.npy"], "not an ovstore token"),
    ("conflicting flags: --worker without --resume", ["capture", "--prompt", "x", "--worker", "0/2", "--out", "{root}/o6.zarr"], "--worker"),
    ("conflicting flags: several prompts into .npy", ["maps", "{store}", "-a", "cat", "-a", "dog", "--out", "{root}/m.npy"], "use FILE.zarr"),
    ("branch both without guidance", ["capture", "--prompt", "x", "--branch", "both", "--guidance", "1", "--out", "{root}/o7.zarr"], "needs classifier-free guidance"),
    ("unknown branch", ["capture", "--prompt", "x", "--branch", "left", "--out", "{root}/o8.zarr"], "--branch"),
    ("branch not stored", ["maps", "{store}", "-a", "cat", "--branch", "cond", "--out", "{root}/m.npy"], "is not stored"),
    ("duplicate label classes", ["label", "{store}", "--classes", "cat,cat", "--out", "{root}/lab"], "duplicates"),
    ("evaluation with missing predictions", ["evaluate", "{root}/pred", "{root}/gt"], "no prediction"),
    ("token file that does not exist", ["maps", "{store}", "--token", "{root}/none.safetensors", "--out", "{root}/m.npy"], "does not exist"),
]


@pytest.mark.parametrize("what,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(fixtures, monkeypatch, capsys, what, args, message):
    store = fixtures / "store.zarr"
    before = digest(fixtures)  # the stores, and the --out targets, which must not be created
    line = run_cli(monkeypatch, capsys, *[a.format(root=fixtures, store=store) for a in args])
    assert message in line, line
    assert digest(fixtures) == before  # existing data unchanged, no output created


def test_hub_id_without_network(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = run_cli(monkeypatch, capsys, "capture", "org/unreachable-model", "--prompt", "x", "--out", tmp_path / "o.zarr")
    assert "local directory" in line
    assert not (tmp_path / "o.zarr").exists()


def test_incomplete_image_and_token_of_another_model(fixtures, monkeypatch, capsys, tiny_pipe, tmp_path):
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token

    pipe, identity = tiny_pipe
    reserved = tmp_path / "reserved.zarr"
    capture(pipe, identity, build_requests([("a cat", None, 0)], num_inference_steps=2), reserved,
            config=CaptureConfig(num_inference_steps=2), reserve_only=True)
    assert "incomplete" in run_cli(monkeypatch, capsys, "maps", reserved, "-a", "cat", "--image", "0", "--out", tmp_path / "m.npy")
    other_pipe, other_identity = load_pipeline(None)
    other = tmp_path / "other.zarr"
    capture(other_pipe, other_identity, build_requests([("a cat", None, 0)], num_inference_steps=2), other,
            config=CaptureConfig(num_inference_steps=2))
    mask = np.zeros((64, 64), bool)
    mask[5:20, 5:20] = True
    (token,) = optimize_tokens(other, [TokenTask("cat", (0,), (mask,))], config=OptimizeConfig(epochs=2))
    save_token(token, tmp_path / "cat.safetensors")
    store = fixtures / "store.zarr"
    before = digest(store)
    line = run_cli(monkeypatch, capsys, "maps", store, "--token", tmp_path / "cat.safetensors", "--out", tmp_path / "t.npy")
    assert "was learned for model" in line and digest(store) == before


def test_nan_queries_are_refused_before_writing(multi_store, tmp_path):
    from ovstore.errors import InvalidInputError
    from ovstore.store import StoreWriter, open_store

    copy = tmp_path / "nan.zarr"
    shutil.copytree(multi_store, copy)
    store = open_store(copy)
    writer = StoreWriter.open(copy, store.layout)
    (slot,) = writer.reserve([store.record(0)])
    queries = {l.name: np.asarray(store._root["layers"][l.name]["queries"][0]) for l in store.layers}
    queries[store.layers[1].name][0, 0, 0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        writer.write_image(slot, image=store.image(0), queries=queries, timesteps=store.timesteps(0),
                           branch_labels=("uncond",))
    assert open_store(copy).incomplete_images() == [slot]


@pytest.mark.parametrize("args,message", [
    (["capture", "--steps", "abc"], "Invalid value for '--steps'"),
    (["maps"], "Missing argument"),
    (["info", "x.zarr", "--bogus"], "No such option: --bogus"),
    (["frobnicate"], "No such command"),
    (["merge", "--out", "x.zarr"], "Missing argument"),
])
def test_usage_errors_are_not_tracebacks(monkeypatch, capsys, tmp_path, args, message):
    """Click's usage errors (raised by the copy of click that typer bundles) end with usage,
    one error line and exit status 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ovstore", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_resume_when_the_recorded_local_model_is_gone(monkeypatch, capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    out = tmp_path / "s.zarr"
    monkeypatch.setattr(sys, "argv", ["ovstore", "capture", str(model), "--prompt", "x", "--steps", "2",
                                      "--out", str(out), "--reserve-only"])
    main()
    capsys.readouterr()
    shutil.rmtree(model)
    before = digest(out)
    line = run_cli(monkeypatch, capsys, "capture", "--resume", "--out", out)
    assert "no longer exists" in line and "MODEL" in line and digest(out) == before


def test_mistyped_relative_model_path_is_not_taken_for_a_hub_id(fixtures, monkeypatch, capsys):
    monkeypatch.chdir(fixtures)
    before = digest(fixtures)
    line = run_cli(monkeypatch, capsys, "capture", "empty_dir/nomodel", "--prompt", "x", "--out", "o10.zarr")
    assert "model path empty_dir/nomodel does not exist" in line and digest(fixtures) == before
