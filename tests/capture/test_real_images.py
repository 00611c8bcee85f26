"""Real images into the store: rendered toy-world scenes captured with the embedded toy model
(img2img strength and DDIM inversion), their provenance, labels of the source, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from reliability_helpers import digest, run_cli  # noqa: E402

from ovstore.capture import CaptureConfig, load_pipeline  # noqa: E402
from ovstore.capture.real_images import (  # noqa: E402
    RealImageMethod, build_image_requests, capture_real_images, read_images_file, reconstruction_error,
)
from ovstore.store import open_store, verify_store  # noqa: E402
from ovstore.toyworld.world import sample_rich_scenes  # noqa: E402

#: Measured on the toy model, 32x32 renders of world v2 (``sample_rich_scenes(3, 4)``, 20 steps):
#: img2img at strength 0.3 22.4-30.6 dB, at 0.5 20.2-27.9 dB, inversion 23.6-32.1 dB, the VAE
#: alone 24.8-33.5 dB. The floor is for these scenes: over the 36 scenes of
#: benchmarks/bench_real_images.py the lowest are 18.7 dB (strength 0.5) and 17.7 dB (inversion).
PSNR_FLOOR = 20.0


@pytest.fixture(scope="module")
def toy():
    return load_pipeline(None)


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    """Three rendered world-v2 scenes as PNG files and their images file (exact masks known)."""
    folder = tmp_path_factory.mktemp("renders")
    scenes = sample_rich_scenes(3, 3)
    with open(folder / "images.jsonl", "w") as f:
        for k, scene in enumerate(scenes):
            scene.to_pil().save(folder / f"scene{k}.png")
            f.write(json.dumps({"image": f"scene{k}.png", "prompt": scene.caption}) + "\n")
    return folder, scenes


def _capture(toy, folder, out, method, *, steps, guidance, batch_size=2, progress=None, lines=None):
    pipe, identity = toy
    requests = build_image_requests(lines or read_images_file(folder / "images.jsonl"), method, guidance=guidance,
                                    num_inference_steps=steps)
    config = CaptureConfig(num_inference_steps=steps, guidance=guidance, height=requests.size[0],
                           width=requests.size[1], batch_size=batch_size)
    return capture_real_images(pipe, identity, requests.records, out, config=config, method=method,
                               progress=progress)


@pytest.fixture(scope="module")
def strength_store(toy, scenes_dir, tmp_path_factory):
    folder, _ = scenes_dir
    out = tmp_path_factory.mktemp("strength") / "real.zarr"
    _capture(toy, folder, out, RealImageMethod("strength", strength=0.3), steps=20, guidance=5.0)
    return out


def test_strength_capture_reconstructs_a_rendered_scene(strength_store, scenes_dir):
    folder, scenes = scenes_dir
    store = open_store(strength_store)
    assert store.is_real_images and store.complete_images() == [0, 1, 2]
    assert verify_store(store).ok
    # img2img at strength 0.3 of 20 steps runs the last int(20 * 0.3) = 6 DDIM steps
    assert store.layout.num_unet_calls == 6 and store.layout.n_steps == 6
    for i, scene in enumerate(scenes):
        source = np.asarray(scene.to_pil())
        assert np.array_equal(store.image(i), source)  # images are the sources
        rgb, psnr, mae = store.reconstruction(i)
        assert (psnr, mae) == pytest.approx(reconstruction_error(rgb, source))
        assert psnr >= PSNR_FLOOR, (i, psnr)
        other = np.asarray(scenes[(i + 1) % len(scenes)].to_pil())
        assert psnr > reconstruction_error(rgb, other)[0] + 5  # it is this scene, not any toy image
        assert not np.array_equal(rgb, source)  # a reconstruction, not a copy
    # the timesteps stored are those the pipeline ran: the last six of the 20-step DDIM schedule
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(store.layout.extra["scheduler_config"])
    scheduler.set_timesteps(20)
    np.testing.assert_array_equal(store.timesteps(0), scheduler.timesteps[-6:].numpy().astype(float))


def test_strength_capture_is_diffusers_img2img(strength_store, toy, scenes_dir):
    """The recorded pass is StableDiffusionImg2ImgPipeline's, with the request's seed."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe, _ = toy
    folder, scenes = scenes_dir
    store = open_store(strength_store)
    record = store.record(1)
    reference = StableDiffusionImg2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    out = reference(prompt=[record.prompt], image=[Image.open(folder / "scene1.png")], strength=0.3,
                    num_inference_steps=20, guidance_scale=5.0, output_type="np",
                    generator=[torch.Generator("cpu").manual_seed(record.seed)]).images[0]
    expected = np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)
    # batch 2 in the capture, 1 here: equal up to float rounding
    assert np.abs(store.reconstruction(1)[0].astype(int) - expected).max() <= 2


def test_provenance_is_recorded_per_image(strength_store, scenes_dir):
    folder, _ = scenes_dir
    store = open_store(strength_store)
    for i in range(3):
        source = json.loads(store.record(i).source)
        path = folder / f"scene{i}.png"
        assert source["path"] == str(path.resolve())
        assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (source["method"], source["strength"], source["resize"]) == ("strength", 0.3, None)
    assert store.layout.extra["real_images"] == {"method": "strength", "strength": 0.3}


def test_invert_reconstructs_and_beats_regeneration_from_noise(toy, scenes_dir, tmp_path):
    folder, scenes = scenes_dir
    pipe, _ = toy
    _capture(toy, folder, tmp_path / "inv.zarr", RealImageMethod("invert"), steps=10, guidance=1.0)
    store = open_store(tmp_path / "inv.zarr")
    assert store.layout.num_unet_calls == 10 and store.layout.branches == ("cond",)
    assert store.layout.extra["scheduler"] == "DDIMScheduler"
    assert json.loads(store.record(0).source)["inversion_guidance"] == 1.0
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    np.testing.assert_array_equal(store.timesteps(0), scheduler.timesteps.numpy().astype(float))
    prompts = [s.caption for s in scenes]
    from_noise = pipe(prompt=prompts, num_inference_steps=10, guidance_scale=1.0, output_type="np",
                      generator=[torch.Generator("cpu").manual_seed(k) for k in range(3)]).images
    for i, scene in enumerate(scenes):
        source = np.asarray(scene.to_pil())
        rgb, psnr, _ = store.reconstruction(i)
        assert psnr >= PSNR_FLOOR, (i, psnr)
        noise_psnr = reconstruction_error(np.round(from_noise[i] * 255).astype(np.uint8), source)[0]
        assert psnr > noise_psnr + 5, (psnr, noise_psnr)  # the inverted latent carries the image


def test_maps_and_label_output_hold_the_source_image(strength_store, tmp_path):
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.label import LabelConfig, label_store
    from ovstore.label.voc import write_jpeg

    store = open_store(strength_store)
    maps = compute_maps(store, ["circle square triangle"], config=MapConfig())
    values = np.asarray(maps)
    assert values.shape[0] == 3 and values.shape[-2:] == (16, 16) and np.isfinite(values).all()
    label_store(store, tmp_path / "voc", LabelConfig(classes=("circle", "square", "triangle")),
                scheduler="synchronous")
    for i in range(3):
        written = (tmp_path / "voc" / "JPEGImages" / f"{i:05d}.jpg").read_bytes()
        write_jpeg(tmp_path / "src.jpg", store.image(i))
        write_jpeg(tmp_path / "rec.jpg", store.reconstruction(i)[0])
        assert written == (tmp_path / "src.jpg").read_bytes()  # the source's pixels, encoded as VOC does
        assert written != (tmp_path / "rec.jpg").read_bytes()
    coco = json.loads((tmp_path / "voc" / "annotations.json").read_text())
    assert coco["images"][0]["ovstore"]["source"]["sha256"] == json.loads(store.record(0).source)["sha256"]


def test_resume_after_interruption_loses_nothing(toy, scenes_dir, tmp_path):
    """Interrupted after the first image, resumed with `ovstore capture --resume`: every image
    complete and equal to an uninterrupted capture (batch size 1: bit-identical)."""
    from ovstore.capture import run_capture

    folder, _ = scenes_dir
    method = RealImageMethod("strength", strength=0.4)

    def stop(slot):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _capture(toy, folder, tmp_path / "cut.zarr", method, steps=10, guidance=5.0, batch_size=1, progress=stop)
    assert open_store(tmp_path / "cut.zarr").complete_images() == [0]
    pipe, identity = toy
    result = run_capture(pipe=pipe, identity=identity, out=tmp_path / "cut.zarr", resume=True)
    assert result.images == (1, 2)
    _capture(toy, folder, tmp_path / "whole.zarr", method, steps=10, guidance=5.0, batch_size=1)
    cut, whole = open_store(tmp_path / "cut.zarr"), open_store(tmp_path / "whole.zarr")
    assert cut.complete_images() == whole.complete_images() == [0, 1, 2] and verify_store(cut).ok
    assert cut.records() == whole.records()
    for i in range(3):
        for layer in cut.layout.layers:
            np.testing.assert_array_equal(cut.queries(layer.name, i), whole.queries(layer.name, i))
        np.testing.assert_array_equal(cut.reconstruction(i)[0], whole.reconstruction(i)[0])
    # the original command plus --resume adds nothing more
    again = run_capture(pipe=pipe, identity=identity, out=tmp_path / "cut.zarr", resume=True,
                        images_file=folder / "images.jsonl", strength=0.4, steps=10, guidance=5.0)
    assert again.images == () and open_store(tmp_path / "cut.zarr").n_images == 3


def test_cli_capture_invert_defaults_to_guidance_one(scenes_dir, tmp_path, monkeypatch, capsys):
    from ovstore.cli import main

    folder, _ = scenes_dir
    monkeypatch.setattr(sys, "argv", ["ovstore", "capture", "--images-file", str(folder / "images.jsonl"),
                                      "--invert", "--steps", "4", "--out", str(tmp_path / "cli.zarr")])
    main()
    store = open_store(tmp_path / "cli.zarr")
    assert [store.record(i).guidance for i in range(3)] == [1.0, 1.0, 1.0]
    assert store.layout.extra["real_images"]["method"] == "invert"


def test_convert_rgb_and_resize(toy, tmp_path):
    """RGBA is composited on white with --convert-rgb; --resize WxH and native resize (bicubic)."""
    from PIL import Image

    rgba = np.zeros((40, 24, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (tmp_path / "f.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "a red square"}) + "\n")
    lines = read_images_file(tmp_path / "f.jsonl")
    method = RealImageMethod("strength", strength=0.5)
    for resize, size in (("32x16", (16, 32)), ("native", (32, 32))):
        requests = build_image_requests(lines, method, resize=resize, convert_rgb=True, guidance=5.0,
                                        num_inference_steps=4)
        pipe, identity = toy
        out = tmp_path / f"{resize}.zarr"
        config = CaptureConfig(num_inference_steps=4, guidance=5.0, height=requests.size[0] if requests.size else None,
                               width=requests.size[1] if requests.size else None)
        capture_real_images(pipe, identity, requests.records, out, config=config, method=method)
        image = open_store(out).image(0)
        assert image.shape == (*size, 3)
        assert tuple(image[1, 1]) == (200, 0, 0) and tuple(image[-2, -2]) == (255, 255, 255)


def _write(folder: Path, name: str, array: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    Image.fromarray(array, mode).save(folder / name)


BAD = [
    # (case, images-file lines, extra options, words the error must contain)
    ("unreadable file", [{"image": "junk.png", "prompt": "a red circle"}], ["--strength", "0.5"], "cannot be read"),
    ("missing file", [{"image": "nope.png", "prompt": "a red circle"}], ["--strength", "0.5"], "does not exist"),
    ("RGBA without --convert-rgb", [{"image": "rgba.png", "prompt": "a red circle"}], ["--strength", "0.5"],
     "--convert-rgb"),
    ("grey without --convert-rgb", [{"image": "grey.png", "prompt": "a red circle"}], ["--strength", "0.5"],
     "not RGB"),
    ("16-bit image", [{"image": "deep.png", "prompt": "a red circle"}], ["--strength", "0.5", "--convert-rgb"],
     "8-bit RGB"),
    ("size the VAE cannot take", [{"image": "odd.png", "prompt": "a red circle"}], ["--strength", "0.5"],
     "--resize 32x32"),
    ("images of different sizes", [{"image": "ok.png", "prompt": "a"}, {"image": "wide.png", "prompt": "b"}],
     ["--strength", "0.5"], "different sizes"),
    ("bad --resize", [{"image": "ok.png", "prompt": "a red circle"}], ["--strength", "0.5", "--resize", "30x30"],
     "multiples of 8"),
    ("strength 0", [{"image": "ok.png", "prompt": "a red circle"}], ["--strength", "0"], "out of range"),
    ("strength above 1", [{"image": "ok.png", "prompt": "a red circle"}], ["--strength", "1.5"], "out of range"),
    ("strength that runs no step", [{"image": "ok.png", "prompt": "a red circle"}],
     ["--strength", "0.05", "--steps", "10"], "runs no denoising step"),
    ("missing prompt", [{"image": "ok.png"}], ["--strength", "0.5"], "\"prompt\" is missing or empty"),
    ("empty prompt", [{"image": "ok.png", "prompt": "  "}], ["--strength", "0.5"], "\"prompt\" is missing or empty"),
    ("both --strength and --invert", [{"image": "ok.png", "prompt": "a"}], ["--strength", "0.5", "--invert"],
     "give one"),
    ("neither --strength nor --invert", [{"image": "ok.png", "prompt": "a"}], [], "needs a method"),
    ("duplicate lines", [{"image": "ok.png", "prompt": "a"}, {"image": "./ok.png", "prompt": "a"}],
     ["--strength", "0.5"], "repeats line 1"),
    ("--strength without --images-file", None, ["--strength", "0.5", "--prompt", "a"], "add --images-file"),
    ("--reserve-only with real images", [{"image": "ok.png", "prompt": "a"}], ["--strength", "0.5", "--reserve-only"],
     "not supported"),
    ("--height with real images", [{"image": "ok.png", "prompt": "a"}], ["--strength", "0.5", "--height", "64"],
     "--resize"),
]


@pytest.mark.parametrize("case,lines,options,words", BAD, ids=[c[0] for c in BAD])
def test_bad_real_image_input(case, lines, options, words, tmp_path, monkeypatch, capsys):
    """One line naming the problem and the fix; nothing written (the folder is unchanged)."""
    _write(tmp_path, "ok.png", np.full((32, 32, 3), 128, np.uint8))
    _write(tmp_path, "wide.png", np.full((32, 64, 3), 128, np.uint8))
    _write(tmp_path, "odd.png", np.full((30, 30, 3), 128, np.uint8))
    _write(tmp_path, "rgba.png", np.full((32, 32, 4), 128, np.uint8), "RGBA")
    _write(tmp_path, "grey.png", np.full((32, 32), 128, np.uint8), "L")
    from PIL import Image

    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    args = ["capture", *options, "--out", str(tmp_path / "out.zarr")]
    if lines is not None:
        (tmp_path / "f.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        args += ["--images-file", str(tmp_path / "f.jsonl")]
    before = digest(tmp_path)
    line = run_cli(monkeypatch, capsys, *args)
    assert line.startswith("error: ") and words in line, line
    assert digest(tmp_path) == before


def test_a_changed_source_stops_the_resume(toy, scenes_dir, tmp_path):
    """The store records each source's SHA-256: a resume after the file changed refuses it."""
    import shutil

    from ovstore.capture import run_capture
    from ovstore.errors import InvalidInputError

    folder, _ = scenes_dir
    copy = tmp_path / "renders"
    shutil.copytree(folder, copy)

    def stop(slot):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _capture(toy, copy, tmp_path / "s.zarr", RealImageMethod("strength", strength=0.5), steps=4, guidance=5.0,
                 batch_size=1, progress=stop)
    _write(copy, "scene1.png", np.zeros((32, 32, 3), np.uint8))
    pipe, identity = toy
    with pytest.raises(InvalidInputError, match="has changed since it was recorded"):
        run_capture(pipe=pipe, identity=identity, out=tmp_path / "s.zarr", resume=True)
    assert open_store(tmp_path / "s.zarr").complete_images() == [0]


def test_sdxl_real_images_through_the_family_seam(tmp_path):
    """The tiny SDXL pipeline: img2img (StableDiffusionXLImg2ImgPipeline) and DDIM inversion."""
    pipe, identity = load_pipeline(str(Path(__file__).resolve().parents[1] / "data" / "online" / "sdxl-pipeline"))
    rng = np.random.default_rng(0)
    h, w = pipe.unet.config.sample_size * pipe.vae_scale_factor, pipe.unet.config.sample_size * pipe.vae_scale_factor
    _write(tmp_path, "x.png", (rng.random((h, w, 3)) * 255).astype(np.uint8))
    (tmp_path / "f.jsonl").write_text(json.dumps({"image": "x.png", "prompt": "a lighthouse"}) + "\n")
    lines = read_images_file(tmp_path / "f.jsonl")
    for method, guidance, calls in ((RealImageMethod("strength", strength=0.5), 5.0, 2),
                                    (RealImageMethod("invert"), 1.0, 4)):
        requests = build_image_requests(lines, method, guidance=guidance, num_inference_steps=4)
        config = CaptureConfig(num_inference_steps=4, guidance=guidance, height=h, width=w)
        out = tmp_path / f"{method.method}.zarr"
        capture_real_images(pipe, identity, requests.records, out, config=config, method=method)
        store = open_store(out)
        assert store.layout.num_unet_calls == calls and store.complete_images() == [0]
        assert store.layout.model.pipeline_class == "StableDiffusionXLPipeline" and verify_store(store).ok
        assert np.isfinite(store.reconstruction(0)[1])


def test_merge_keeps_sources_and_reconstructions(strength_store, tmp_path):
    from ovstore.store import merge_stores

    merge_stores(tmp_path / "merged.zarr", [strength_store])
    merged, source = open_store(tmp_path / "merged.zarr"), open_store(strength_store)
    assert merged.is_real_images and merged.records() == source.records() and verify_store(merged).ok
    for i in range(3):
        np.testing.assert_array_equal(merged.image(i), source.image(i))
        assert merged.reconstruction(i)[1] == source.reconstruction(i)[1]
        np.testing.assert_array_equal(merged.reconstruction(i)[0], source.reconstruction(i)[0])


def _faults():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fault_injection", Path(__file__).resolve().parents[2] / "scripts" / "fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.parametrize("point,pattern,half", [
    ("mid-shard of image 1's queries", r"/killed\.zarr/layers/up_blocks[^/]*/queries/c/1/", True),
    ("image 1's reconstruction, before its marker", r"/killed\.zarr/reconstructions/c/1/", False),
])
def test_sigkill_then_resume_loses_nothing(point, pattern, half, scenes_dir, tmp_path):
    """SIGKILL inside the writes of image 1; `ovstore capture --resume --out STORE` finishes it,
    and every image equals an uninterrupted capture's."""
    import os
    import signal

    faults = _faults()
    folder, _ = scenes_dir
    args = lambda out: ("capture", "--images-file", folder / "images.jsonl", "--strength", "0.5", "--steps",  # noqa
                        "4", "--guidance", "5", "--out", out)
    faults.run_cli(*args(tmp_path / "reference.zarr"))
    status = faults.killed_run(lambda: faults.run_cli(*args(tmp_path / "killed.zarr")), pattern, 1, half)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, point
    assert open_store(tmp_path / "killed.zarr").complete_images() == [0]
    faults.run_cli("capture", "--resume", "--out", tmp_path / "killed.zarr")
    killed, reference = open_store(tmp_path / "killed.zarr"), open_store(tmp_path / "reference.zarr")
    assert killed.complete_images() == [0, 1, 2] and verify_store(killed).ok
    assert killed.records() == reference.records()
    for i in range(3):
        np.testing.assert_array_equal(killed.reconstruction(i)[0], reference.reconstruction(i)[0])
        np.testing.assert_array_equal(killed.timesteps(i), reference.timesteps(i))
        for layer in killed.layout.layers:
            np.testing.assert_array_equal(killed.queries(layer.name, i, branch=None),
                                          reference.queries(layer.name, i, branch=None))


def test_families_without_real_image_support_refuse_them():
    from ovstore.errors import InvalidInputError
    from ovstore.families import get_family

    for name in ("sd3", "flux"):
        with pytest.raises(InvalidInputError, match="captures generations only"):
            get_family(name).image_to_image(object())


def test_real_image_captures_keep_self_attention_too(scenes_dir, tmp_path):
    from ovstore.capture import run_capture

    folder, _ = scenes_dir
    run_capture(images_file=folder / "images.jsonl", strength=0.3, steps=4, out=tmp_path / "sa.zarr",
                self_attention="16")
    store = open_store(tmp_path / "sa.zarr")
    assert store.is_real_images and store.layout.self_attention == ((16, 16),)
    for image in store.complete_images():
        matrix = store.self_attention(image).astype(np.float32)
        np.testing.assert_allclose(matrix.sum(axis=-1), 1.0, atol=0.05)
