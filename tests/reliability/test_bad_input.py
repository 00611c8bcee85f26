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
    _careless_inputs(root, store)
    return root


def _careless_inputs(root: Path, store: Path) -> None:
    """Files as a careless or hostile user makes them: other encodings, blank lines, NaN
    tokens, hand-edited store metadata."""
    import torch
    from safetensors.torch import save_file

    from ovstore.optimize.tokens import TokenFile
    from ovstore.store import open_store

    (root / "latin1.txt").write_bytes("a cat\na dog\ncaf\xe9 au lait\n".encode("latin-1"))
    (root / "utf16.txt").write_bytes("a cat\n".encode("utf-16"))
    (root / "binary.txt").write_bytes(b"a cat\n\x00\x01\x02\n")
    (root / "blank_only.txt").write_text("\n   \n# a comment\n\n")
    (root / "prompts_big_seed.jsonl").write_text('{"prompt": "a cat", "seed": 18446744073709551616}\n')
    (root / "classes_gap.txt").write_text("cat\n\ndog\n")
    (root / "tasks_bad_init.jsonl").write_text('{"init": 5, "images": [0], "masks": ["mask.png"]}\n')
    nan_mask = np.zeros((64, 64), np.float32)
    nan_mask[10:30, 10:30] = 1.0
    nan_mask[0, 0] = np.nan
    Image.fromarray(nan_mask, mode="F").save(root / "nan_mask.tif")
    identity = open_store(store).layout.model
    hidden = identity.text_encoder_hidden_size

    def token(name: str, embedding, **meta) -> None:
        info = TokenFile(name="cat", embedding=embedding, init_word="cat", model_id=identity.id,
                         text_encoder_fingerprint=identity.text_encoder_fingerprint, hidden_size=hidden).metadata()
        save_file({"embedding": embedding}, str(root / name), metadata={**info, **meta})

    nan = torch.zeros(2, hidden)
    nan[1, 3] = float("nan")
    token("nan_token.safetensors", nan)
    token("inf_token.safetensors", torch.full((2, hidden), float("inf")))
    token("int_token.safetensors", torch.zeros(2, hidden, dtype=torch.int32))
    token("short_token.safetensors", torch.zeros(3, hidden))
    token("future_token.safetensors", torch.zeros(2, hidden), format_version="9")
    token("mangled_token.safetensors", torch.zeros(2, hidden), format_version="one")
    for name, edit in [("edited_scale.zarr", lambda m: m["layout"]["layers"][0].__setitem__("scale", 0.5)),
                       ("edited_heads.zarr", lambda m: m["layout"]["layers"][1].__setitem__("heads", 1)),
                       ("string_version.zarr", lambda m: m.__setitem__("format_version", "1")),
                       ("bool_version.zarr", lambda m: m.__setitem__("format_version", True)),
                       ("old_version.zarr", lambda m: m.__setitem__("format_version", 0))]:
        edited = root / name
        shutil.copytree(store, edited)
        group = zarr.open_group(edited, mode="r+")
        meta = json.loads(json.dumps(group.attrs["ovstore"]))
        edit(meta)
        group.attrs["ovstore"] = meta


CASES = [
    ("missing model path", ["capture", "{root}/no/such/model", "--prompt", "x", "--out", "{root}/o1.zarr"], "does not exist"),
    ("directory that is not a pipeline", ["capture", "{root}/empty_dir", "--prompt", "x", "--out", "{root}/o2.zarr"], "not a diffusers pipeline"),
    ("pipeline without cross-attention", ["capture", "{root}/ddpm", "--prompt", "x", "--out", "{root}/o3.zarr"], "no ovstore model family supports"),
    ("not an ovstore store", ["info", "{root}/plain.zarr"], "not an ovstore store"),
    ("missing store", ["maps", "{root}/none.zarr", "-a", "cat"], "does not exist"),
    ("newer format version", ["info", "{root}/future.zarr"], "version 99"),
    ("text encoder of another hidden size", ["maps", "{store}", "-a", "cat", "--model", "{root}/other-encoder", "--out", "{root}/m.npy"], "Use the text encoder of the captured model"),
    ("attribution longer than the encoder's limit", ["maps", "{store}", "-a", " ".join(["cat"] * 90), "--out", "{root}/m.npy"], "at most 77"),
    ("empty attribution prompt", ["maps", "{store}", "-a", "  ", "--out", "{root}/m.npy"], "empty"),
    ("unknown layer name", ["maps", "{store}", "-a", "cat", "--layer", "up_blocks.9*", "--out", "{root}/m.npy"], "matches no cross-attention layer"),
    ("unknown resolution", ["maps", "{store}", "-a", "cat", "--resolution", "7x7", "--out", "{root}/m.npy"], "no cross-attention layer has resolution 7x7"),
    ("stored-call index out of range", ["maps", "{store}", "-a", "cat", "--calls", "50", "--out", "{root}/m.npy"], "out of range"),
    ("image index out of range", ["maps", "{store}", "-a", "cat", "--image", "99", "--out", "{root}/m.npy"], "out of range"),
    ("malformed call specification", ["maps", "{store}", "-a", "cat", "--calls", "1:x", "--out", "{root}/m.npy"], "not an integer"),
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
    # text files: encodings, blank lines, line numbers
    ("prompts file that is not UTF-8 (line number)", ["capture", "--prompts-file", "{root}/latin1.txt", "--out", "{root}/o11.zarr"], "line 3: not UTF-8"),
    ("prompts file in UTF-16", ["capture", "--prompts-file", "{root}/utf16.txt", "--out", "{root}/o12.zarr"], "UTF-16"),
    ("prompts file that is binary", ["capture", "--prompts-file", "{root}/binary.txt", "--out", "{root}/o13.zarr"], "line 2: contains a NUL"),
    ("prompts file without a prompt", ["capture", "--prompts-file", "{root}/blank_only.txt", "--out", "{root}/o14.zarr"], "has no prompt"),
    ("attributions file that is not UTF-8 (line number)", ["maps", "{store}", "--attributions-file", "{root}/latin1.txt", "--out", "{root}/m.zarr"], "line 3: not UTF-8"),
    ("attributions file that does not exist", ["maps", "{store}", "--attributions-file", "{root}/none.txt", "--out", "{root}/m.zarr"], "does not exist"),
    ("attributions file that is a directory", ["maps", "{store}", "--attributions-file", "{root}/empty_dir", "--out", "{root}/m.zarr"], "is a directory"),
    ("attributions file without a prompt", ["maps", "{store}", "--attributions-file", "{root}/blank_only.txt", "--out", "{root}/m.zarr"], "no attribution"),
    ("empty class name in --classes", ["label", "{store}", "--classes", "cat,,dog", "--out", "{root}/lab"], "name 2 is empty"),
    ("trailing comma in --classes", ["label", "{store}", "--classes", "cat,dog,", "--out", "{root}/lab"], "name 3 is empty"),
    ("blank line inside --classes-file", ["label", "{store}", "--classes-file", "{root}/classes_gap.txt", "--out", "{root}/lab"], "line 2 is blank"),
    ("--classes-file that is not UTF-8", ["label", "{store}", "--classes-file", "{root}/latin1.txt", "--out", "{root}/lab"], "not UTF-8"),
    ("empty class name in evaluate --classes", ["evaluate", "{root}/pred", "{root}/gt", "--classes", "a,,b"], "name 2 is empty"),
    ("--labelmap that does not exist", ["evaluate", "{root}/pred", "{root}/gt", "--labelmap", "{root}/none.txt"], "does not exist"),
    ("--tasks-file that is not UTF-8", ["optimize", "{store}", "--tasks-file", "{root}/latin1.txt", "--out", "{root}/tokens"], "line 3: not UTF-8"),
    ("--tasks-file with a non-word init", ["optimize", "{store}", "--tasks-file", "{root}/tasks_bad_init.jsonl", "--out", "{root}/tokens"], "line 1: \"init\" must be a word"),
    # seeds and other numbers, each with its valid range
    ("seed beyond the generator's range", ["capture", "--prompt", "x", "--seed", str(2**64), "--out", "{root}/o15.zarr"], "out of range; valid: 0..9223372036854775807"),
    ("negative seed", ["capture", "--prompt", "x", "--seed", "-1", "--out", "{root}/o16.zarr"], "out of range"),
    ("seed + image index beyond the range", ["capture", "-p", "x", "-p", "y", "--seed", str(2**63 - 1), "--out", "{root}/o17.zarr"], "beyond the largest seed"),
    ("JSONL seed beyond the range (line number)", ["capture", "--prompts-file", "{root}/prompts_big_seed.jsonl", "--out", "{root}/o18.zarr"], "line 1: \"seed\""),
    ("zero denoising steps", ["capture", "--prompt", "x", "--steps", "0", "--out", "{root}/o19.zarr"], "--steps 0 is out of range; valid: 1 <= value <= 1000"),
    ("too many denoising steps", ["capture", "--prompt", "x", "--steps", "5000", "--out", "{root}/o20.zarr"], "<= 1000"),
    ("guidance that is not a number", ["capture", "--prompt", "x", "--guidance", "nan", "--out", "{root}/o21.zarr"], "finite"),
    ("negative guidance", ["capture", "--prompt", "x", "--guidance", "-2", "--out", "{root}/o22.zarr"], "--guidance -2 is out of range"),
    ("height not a multiple of 8", ["capture", "--prompt", "x", "--height", "30", "--out", "{root}/o23.zarr"], "multiple of 8"),
    ("height beyond any model", ["capture", "--prompt", "x", "--height", "100000", "--out", "{root}/o24.zarr"], "<= 8192"),
    ("zero batch size", ["capture", "--prompt", "x", "--batch-size", "0", "--out", "{root}/o25.zarr"], "--batch-size 0 is out of range"),
    ("a value after a switch (--resume true)", ["capture", "--resume", "true", "--out", "{root}/o26.zarr"], "looks like the value of a switch"),
    ("zero step in a call slice", ["maps", "{store}", "-a", "cat", "--calls", "0:4:0", "--out", "{root}/m.npy"], "has step 0"),
    ("zero step in a capture --calls slice", ["capture", "--prompt", "x", "--calls", "::0", "--out", "{root}/o27.zarr"], "has step 0"),
    ("empty part in a call list", ["maps", "{store}", "-a", "cat", "--calls", "0,,1", "--out", "{root}/m.npy"], "empty part"),
    ("too many ':' in a call slice", ["maps", "{store}", "-a", "cat", "--calls", "1:2:3:4", "--out", "{root}/m.npy"], "too many ':'"),
    ("--calls with the deprecated --steps", ["maps", "{store}", "-a", "cat", "--calls", "0", "--steps", "1", "--out", "{root}/m.npy"], "give only --calls"),
    ("zero map size", ["maps", "{store}", "-a", "cat", "--size", "0", "64", "--out", "{root}/m.npy"], "--size 0 is out of range"),
    ("map size beyond the limit", ["maps", "{store}", "-a", "cat", "--size", "100000", "64", "--out", "{root}/m.zarr"], "<= 16384"),
    ("negative image index", ["maps", "{store}", "-a", "cat", "--image", "-1", "--out", "{root}/m.npy"], "out of range"),
    ("learning rate that is not a number", ["optimize", "{store}", "--image", "0", "--mask", "{root}/mask.png", "--init", "cat", "--lr", "nan", "--out", "{root}/t.safetensors"], "--lr nan must be a finite number"),
    ("zero learning rate", ["optimize", "{store}", "--image", "0", "--mask", "{root}/mask.png", "--init", "cat", "--lr", "0", "--out", "{root}/t.safetensors"], "--lr 0 is out of range; valid: > 0"),
    ("zero epochs", ["optimize", "{store}", "--image", "0", "--mask", "{root}/mask.png", "--init", "cat", "--epochs", "0", "--out", "{root}/t.safetensors"], "--epochs 0 is out of range"),
    ("learning-rate factor above 1", ["optimize", "{store}", "--image", "0", "--mask", "{root}/mask.png", "--init", "cat", "--lr-gamma", "2", "--out", "{root}/t.safetensors"], "--lr-gamma 2 is out of range"),
    ("threshold that is not a number", ["label", "{store}", "--classes", "cat", "--threshold", "nan", "--out", "{root}/lab"], "between 0 and 1"),
    ("threshold above 1", ["label", "{store}", "--classes", "cat", "--threshold", "1.5", "--out", "{root}/lab"], "between 0 and 1"),
    ("per-class threshold that is not a number", ["label", "{store}", "--classes", "cat", "--class-threshold", "cat=nan", "--out", "{root}/lab"], "between 0 and 1"),
    ("zero partition size", ["label", "{store}", "--classes", "cat", "--partition-size", "0", "--out", "{root}/lab"], "--partition-size 0 is out of range"),
    ("zero workers", ["label", "{store}", "--classes", "cat", "--workers", "0", "--out", "{root}/lab"], "--workers 0 is out of range"),
    ("demo with zero epochs", ["demo", "--epochs", "0", "--out", "{root}/demo"], "--epochs 0 is out of range"),
    ("negative minimum component", ["label", "{store}", "--classes", "cat", "--min-component", "-1", "--out", "{root}/lab"], "--min-component"),
    # option values a new user mistypes
    ("empty --prompt", ["capture", "--prompt", "  ", "--out", "{root}/o28.zarr"], "is empty"),
    ("unknown --dtype", ["capture", "--prompt", "x", "--dtype", "float64", "--out", "{root}/o29.zarr"], "--dtype 'float64' is not one of"),
    ("unknown --codec", ["capture", "--prompt", "x", "--codec", "lz4", "--out", "{root}/o30.zarr"], "--codec 'lz4' is not one of"),
    ("unknown --preset", ["capture", "--prompt", "x", "--preset", "small", "--out", "{root}/o31.zarr"], "--preset 'small' is not one of"),
    ("--preset that chooses calls with --calls", ["capture", "--prompt", "x", "--preset", "half-calls", "--calls", "0", "--out", "{root}/o32.zarr"], "drop --calls or the preset"),
    ("resolution that is not a size", ["maps", "{store}", "-a", "cat", "--resolution", "big", "--out", "{root}/m.npy"], "write it as 16 or 16x16"),
    ("unknown --activation", ["maps", "{store}", "-a", "cat", "--activation", "relu", "--out", "{root}/m.npy"], "activation 'relu' is not one of"),
    ("unknown --normalize of maps", ["maps", "{store}", "-a", "cat", "--normalize", "zscore", "--out", "{root}/m.npy"], "normalize 'zscore' is not one of"),
    ("unknown --aggregation", ["maps", "{store}", "-a", "cat", "--aggregation", "max", "--out", "{root}/m.npy"], "--aggregation 'max' is not one of"),
    ("maps --out of another kind", ["maps", "{store}", "-a", "cat", "--out", "{root}/m.txt"], "use a .npy (one prompt) or .zarr"),
    ("--combine-tokens without tokens", ["maps", "{store}", "-a", "cat", "--combine-tokens", "--out", "{root}/m.zarr"], "--combine-tokens needs --token"),
    ("optimize --out that is not .safetensors", ["optimize", "{store}", "--image", "0", "--mask", "{root}/mask.png", "--init", "cat", "--out", "{root}/t.pt"], "must end in .safetensors"),
    ("optimize --context without {}", ["optimize", "{store}", "--image", "0", "--mask", "{root}/mask.png", "--init", "cat", "--context", "a photo", "--out", "{root}/t.safetensors"], "must contain {}"),
    ("optimize --tasks-file with --image", ["optimize", "{store}", "--tasks-file", "{root}/tasks_bad_init.jsonl", "--image", "0", "--out", "{root}/tokens"], "drop --image"),
    ("label --prompt-template without {}", ["label", "{store}", "--classes", "cat", "--prompt-template", "a photo", "--out", "{root}/lab"], "needs {} for the class word"),
    ("unknown label --mode", ["label", "{store}", "--classes", "cat", "--mode", "joint", "--out", "{root}/lab"], "--mode 'joint' is not one of"),
    ("unknown label --normalize", ["label", "{store}", "--classes", "cat", "--normalize", "none", "--out", "{root}/lab"], "--normalize 'none' is not one of"),
    ("--class-threshold without a value", ["label", "{store}", "--classes", "cat", "--class-threshold", "cat", "--out", "{root}/lab"], "write CLASS=VALUE"),
    ("--maps-from not a source", ["label", "{store}", "--classes", "cat", "--maps-from", "caption", "--out", "{root}/lab"], "--maps-from 'caption' is not one of template, prompt"),
    ("--class-words without words", ["label", "{store}", "--classes", "cat", "--class-words", "cat", "--out", "{root}/lab"], "write CLASS=WORD,WORD"),
    ("--class-words of a class not labelled", ["label", "{store}", "--classes", "cat", "--class-words", "dog=puppy", "--out", "{root}/lab"], "which is not in --classes"),
    ("--class-threshold of a class not labelled", ["label", "{store}", "--classes", "cat", "--class-threshold", "dog=0.5", "--out", "{root}/lab"], "is not in --classes"),
    ("--sweep without --adaptive", ["label", "{store}", "--classes", "cat", "--sweep", "0.5:0.9:0.1", "--out", "{root}/lab"], "add --adaptive"),
    ("--sweep running backwards", ["label", "{store}", "--classes", "cat", "--adaptive", "--sweep", "0.9:0.5:0.1", "--out", "{root}/lab"], "START:STOP:STEP with STEP > 0"),
    ("class name with ':'", ["label", "{store}", "--classes", "cat:big", "--out", "{root}/lab"], "labelmap.txt"),
    ("evaluate with --classes and --labelmap", ["evaluate", "{root}/pred", "{root}/gt", "--classes", "a", "--labelmap", "{root}/a_file.txt"], "not both"),
    # token files and masks
    ("token whose embedding holds NaN", ["maps", "{store}", "--token", "{root}/nan_token.safetensors", "--out", "{root}/m.npy"], "1 NaN or Inf values"),
    ("token whose embedding holds Inf", ["maps", "{store}", "--token", "{root}/inf_token.safetensors", "--out", "{root}/m.npy"], "NaN or Inf"),
    ("token of integers", ["maps", "{store}", "--token", "{root}/int_token.safetensors", "--out", "{root}/m.npy"], "torch.int32, not a float tensor"),
    ("token of the wrong shape", ["maps", "{store}", "--token", "{root}/short_token.safetensors", "--out", "{root}/m.npy"], "expected (2, "),
    ("token of a newer token format", ["maps", "{store}", "--token", "{root}/future_token.safetensors", "--out", "{root}/m.npy"], "upgrade ovstore"),
    ("token whose format version is not a number", ["label", "{store}", "--classes", "cat", "--token", "{root}/mangled_token.safetensors", "--out", "{root}/lab"], "not an integer"),
    ("mask holding NaN", ["optimize", "{store}", "--image", "0", "--mask", "{root}/nan_mask.tif", "--init", "cat", "--out", "{root}/t.safetensors"], "1 NaN or Inf values"),
    # store metadata edited by hand
    ("layer scale edited in zarr.json", ["maps", "{root}/edited_scale.zarr", "-a", "cat", "--out", "{root}/m.npy"], "does not match its checksum"),
    ("layer heads edited, then verify", ["verify", "{root}/edited_heads.zarr"], "does not match its checksum"),
    ("format version written as a string", ["info", "{root}/string_version.zarr"], "format version is '1', not an integer"),
    ("format version written as a boolean", ["info", "{root}/bool_version.zarr"], "not an integer"),
    ("store of an older format version", ["info", "{root}/old_version.zarr"], "older than this ovstore reads"),
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
