#!/usr/bin/env python
"""Train the toy-world text-to-image pipeline from scratch (CPU or CUDA).

Two stages:

1. the autoencoder alone (reconstruction + a tiny KL term), then frozen; its latent
   scaling factor is set so that latents have unit standard deviation;
2. UNet and CLIP text encoder jointly on the frozen latents: epsilon prediction with
   min-SNR weighting, AdamW with warm-up, EMA of the weights, caption dropout to the
   empty prompt (for classifier-free guidance); optionally a grounding term
   (``--ground-weight``): for each colour word and noun of a caption, the share of its
   cross-attention (softmax over the 77 tokens, heads averaged, the reference's map at
   one layer and step) that falls outside its object's exact mask is penalised
   (TokenCompose's token loss), and the text encoder may learn at a fraction of the
   UNet's rate (``--text-lr-scale``).

Against attention drained into end-of-text and padding (which ovstore's maps, softmax over
an attribution's own tokens, never see), three v2 augmentations: ``--unpadded-p`` cuts a
share of the contexts after end-of-text with the UNet's ``encoder_attention_mask`` (the
grounding term sees the same mask), so the model also learns to attend the way the maps
are computed; ``--list-p`` gives a share of captions as bare word lists ("circle square",
the reference protocol's attribution); ``--partial-p`` names only some of a scene's
objects, so that a word alone must not attend to the objects it does not name. A run
resumed with other settings keeps each recipe and the step it started at (``recipe`` in
``training.json``).

``--world v2`` (the default) trains on :func:`ovstore.toyworld.world.sample_rich_scene`
scenes (overlaps, textured backgrounds, shading, captions in random order with synonyms,
hypernyms and ``--bare-p`` colour-less phrases); captions of the held-out split are never
drawn, so probes on them (:func:`ovstore.toyworld.probe.rich_probe_scenes`) are held out
in seeds and captions. ``--world v1`` is the world of the first shipped model.

Every batch is drawn from a generator seeded by ``(seed, step)`` and so is the noise,
so a run resumed from a checkpoint (``--resume``) continues exactly as if it had never
stopped. Checkpoints, the exported pipeline and ``training.json`` are written atomically
(temporary file, then rename). A periodic probe generates images, rebuilds the
cross-attention (OVAM-style) maps of the colour and shape words and reports their top-k
IoU against the masks recovered from the generated images, next to baselines.

Example::

    python scripts/train_toyworld.py --out /root/ovstore-train/run1 --steps 16000
    python scripts/train_toyworld.py --out RUN --resume          # continue exactly
    python scripts/train_toyworld.py --out RUN --device cuda     # same recipe on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ovstore.toyworld.model import build_toy_pipeline, parameter_counts, save_toy_pipeline  # noqa: E402
from ovstore.toyworld.probe import probe_grid, rich_probe_scenes, run_word_probe  # noqa: E402
from ovstore.toyworld.probe import probe_scenes as v1_probe_scenes  # noqa: E402
from ovstore.toyworld.world import sample_rich_scene, sample_scene, scenes_to_array  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoints, logs, pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N); batches and noise are drawn on the CPU "
                                                   "either way, so both follow the same recipe")
    p.add_argument("--world", choices=("v1", "v2"), default="v2")
    p.add_argument("--synonym-p", type=float, default=0.3, help="v2: share of nouns given as a synonym")
    p.add_argument("--hypernym-p", type=float, default=0.1, help="v2: share of nouns given as shape/object")
    p.add_argument("--bare-p", type=float, default=0.15, help="v2: share of phrases without their colour")
    p.add_argument("--overlap-p", type=float, default=0.4, help="v2: share of scenes whose objects may overlap")
    p.add_argument("--list-p", type=float, default=0.0,
                   help="v2: share of captions given as a bare word list ('circle square', 'red ball , blue box'), "
                        "the form of a bare attribution")
    p.add_argument("--partial-p", type=float, default=0.0,
                   help="v2: share of multi-object captions that name only some of the objects, so that a word "
                        "alone must not attend to the objects it does not name")
    p.add_argument("--unpadded-p", type=float, default=0.0,
                   help="share of samples whose context is cut after end-of-text (an attention mask over the "
                        "padding): the way ovstore's maps see an attribution, softmax over its own tokens only")
    p.add_argument("--tokenizer", default=None, help="CLIPTokenizer folder (default: the one in ovstore)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--text-hidden", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--unet-channels", default="32,64,64")
    p.add_argument("--unet-layers", type=int, default=1)
    p.add_argument("--unet-heads", type=int, default=4)
    p.add_argument("--freeze-text", action="store_true", help="keep the random text encoder frozen")
    # autoencoder stage
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--vae-from", type=Path, default=None,
                   help="a vae.pt of an earlier run of the same --world and --image-size (skips stage 1)")
    # diffusion stage
    p.add_argument("--steps", type=int, default=16000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay to this fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting; 0 disables")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--text-lr-scale", type=float, default=1.0, help="text encoder lr = this x --lr")
    p.add_argument("--ground-weight", type=float, default=0.0,
                   help="weight of the grounding term (attention share of a word outside its object)")
    p.add_argument("--pixel-weight", type=float, default=0.0,
                   help="weight of the pixel grounding term (TokenCompose's L_pixel: binary cross-entropy of a "
                        "word's per-pixel attention against its object's mask), which asks for the whole object, "
                        "not only its core")
    # bookkeeping
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--probe-every", type=int, default=1000)
    p.add_argument("--probe-per-count", type=int, default=8, help="probe captions per object count (1,2,3)")
    p.add_argument("--probe-steps", type=int, default=20)
    p.add_argument("--probe-guidance", type=float, default=3.0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if present")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from an exported pipeline (e.g. src/ovstore/data/toy-shapes) when its checkpoint "
                        "is gone: its weights become the live and EMA weights, the autoencoder is kept, AdamW "
                        "starts afresh and is warmed up again over --warmup steps from --init-step")
    p.add_argument("--init-step", type=int, default=0, help="the training step the --init-from pipeline reached")
    return p.parse_args(argv)


class Log:
    """Print and append to ``OUT/train.log`` (flushed, so ``tail -f`` works)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")


def atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")
    os.replace(tmp, path)


def hardware() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.device(DEVICE)
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


DEVICE = "cpu"
#: Arguments that do not change what is trained (where and how often things are written).
_NOT_RECIPE = {"out", "resume", "threads", "device", "log_every", "ckpt_every", "probe_every"}
WORLD: dict[str, object] = {"world": "v2"}


def batch_scenes(seed: int, stream: int, step: int, n: int, image_size: int) -> list:
    """Scenes of one step: a pure function of (seed, stream, step), hence resumable."""
    rng = np.random.default_rng([seed, stream, step])
    if WORLD["world"] == "v1":
        return [sample_scene(rng, image_size=image_size) for _ in range(n)]
    kw = {k: v for k, v in WORLD.items() if k != "world"}
    return [sample_rich_scene(rng, image_size=image_size, split="train", **kw) for _ in range(n)]


def batch_images(seed: int, stream: int, step: int, n: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """Images (``[-1, 1]``, on the CPU) and captions of one step."""
    scenes = batch_scenes(seed, stream, step, n, image_size)
    return torch.from_numpy(scenes_to_array(scenes)), [s.caption for s in scenes]


Words = list[tuple[str, "int | None"]]


def caption_words(caption: str, scene) -> Words:
    """The words of a world caption (commas split off, as the CLIP tokenizer splits them),
    each with the index of the object it names: the colour word and noun of each phrase
    ``'a [colour] noun'``, in caption order; ``None`` for fillers."""
    order = scene.caption_order or tuple(range(len(scene.objects)))
    out: Words = []
    phrase_i, expect = -1, set()
    for w in caption.replace(",", " , ").split():
        if w == "a":
            phrase_i += 1
            obj = scene.objects[order[phrase_i]]
            expect = {obj.word} | ({obj.color} if not obj.bare else set())
            out.append((w, None))
        else:
            out.append((w, order[phrase_i] if w in expect else None))
    return out


def training_words(scene, rng: np.random.Generator, list_p: float, partial_p: float) -> Words:
    """The words of the caption one training sample uses: the scene's own caption, or (v2
    caption augmentation) some of its phrases only (``partial_p``, scenes of 2-3 objects)
    and/or its phrases as a bare word list (``list_p``). An augmented caption that falls in
    the held-out split is replaced by the scene's own caption, so the split stays held out."""
    from ovstore.toyworld.world import JOINERS, is_held_out_caption

    order = list(scene.caption_order or range(len(scene.objects)))
    partial = len(order) > 1 and rng.random() < partial_p
    as_list = rng.random() < list_p
    if not (partial or as_list):
        return caption_words(scene.caption, scene)
    if partial:
        keep = sorted(rng.choice(len(order), size=int(rng.integers(1, len(order))), replace=False).tolist())
        order = [order[i] for i in keep]
    words: Words = []
    if as_list:
        with_colour = rng.random() < 0.5
        comma = rng.random() < 0.5
        for n, i in enumerate(order):
            obj = scene.objects[i]
            if n and comma:
                words.append((",", None))
            if with_colour and not obj.bare:
                words.append((obj.color, i))
            words.append((obj.word, i))
    else:
        for n, i in enumerate(order):
            obj = scene.objects[i]
            if n:
                words += [(w, None) for w in JOINERS[int(rng.integers(len(JOINERS)))].replace(",", " , ").split()]
            words.append(("a", None))
            if not obj.bare:
                words.append((obj.color, i))
            words.append((obj.word, i))
    if is_held_out_caption(" ".join(w for w, _ in words).replace(" , ", ", ")):
        return caption_words(scene.caption, scene)
    return words


def words_caption(words: Words) -> str:
    return " ".join(w for w, _ in words).replace(" , ", ", ")


def grounding_targets(words: list[Words], scenes: list, tokenizer,
                      keep: list[bool]) -> list[tuple[int, int, np.ndarray]]:
    """``(sample, token position, exact object mask)`` for each colour word and noun of each
    kept caption (a word of several BPE tokens gives each token its object's mask)."""
    out = []
    for b, (sample_words, scene) in enumerate(zip(words, scenes)):
        if not keep[b]:
            continue
        pos = 1
        for w, obj in sample_words:
            n_tok = len(tokenizer(w, add_special_tokens=False).input_ids)
            if obj is not None:
                for t in range(pos, pos + n_tok):
                    if t < tokenizer.model_max_length - 1:
                        out.append((b, t, scene.object_masks[obj]))
            pos += n_tok
    return out


def train_vae(vae, args: argparse.Namespace, log: Log) -> dict[str, float]:
    """Plain autoencoder training; returns reconstruction figures and the scaling factor."""
    from ovstore.toyworld.world import classify_pixels

    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.vae_steps):
        x, _ = batch_images(args.seed, 1, step, args.vae_batch, args.image_size)
        cosine = 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        lr = args.vae_lr * min(1.0, (step + 1) / 100) * (0.9 * cosine + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        post = vae.encode(x).latent_dist
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.3f} lr {lr:.2e} "
                f"{(step + 1) / (time.time() - t0):.2f} steps/s")
    vae.eval().requires_grad_(False)
    x, _ = batch_images(args.seed, 4, 0, 256, args.image_size)
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
        rec = vae.decode(lat).sample
    std = float(lat.std())
    to_u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    acc = float(np.mean([(classify_pixels(a) == classify_pixels(b)).mean() for a, b in zip(to_u8(x), to_u8(rec))]))
    stats = {"vae_steps": args.vae_steps, "vae_mse": float(torch.nn.functional.mse_loss(rec, x)),
             "vae_pixel_class_agreement": acc, "latent_std": std, "scaling_factor": 1.0 / std,
             "vae_seconds": time.time() - t0}
    log(f"vae done: {stats}")
    return stats


class Grounder:
    """Hooks on the UNet's cross-attention (``attn2``, mid block left out as in ovstore's
    maps) that keep each layer's token-softmax attention of the current forward pass, with
    gradients, and turn it into the grounding term."""

    def __init__(self, unet) -> None:
        self.layers = [m for n, m in unet.named_modules() if n.endswith("attn2") and not n.startswith("mid_block")]
        self.probs: list[torch.Tensor] = []
        self.emb = None
        self.bias = None
        for attn in self.layers:
            attn.to_q.register_forward_hook(self._hook(attn))

    def _hook(self, attn):
        def hook(_m, _inp, q):
            if self.emb is None:
                return
            k = attn.to_k(self.emb)
            n, hw, c = q.shape
            h = attn.heads
            qh = q.view(n, hw, h, c // h).transpose(1, 2)
            kh = k.view(n, -1, h, c // h).transpose(1, 2)
            logits = qh @ kh.transpose(-1, -2) * attn.scale
            if self.bias is not None:
                logits = logits + self.bias[:, None, None, :]
            self.probs.append(torch.softmax(logits, dim=-1).mean(1))  # (n, hw, T)
        return hook

    def start(self, emb: torch.Tensor | None, keep: torch.Tensor | None = None) -> None:
        """Begin a forward pass on context ``emb``; ``keep`` (n, T) masks context rows out
        as the UNet's ``encoder_attention_mask`` does."""
        self.emb, self.probs = emb, []
        self.bias = None if keep is None else (1 - keep.to(emb.dtype)) * -10000.0

    def loss(self, targets: list) -> torch.Tensor:
        """Mean over layers and (sample, token) targets of 1 - (attention inside the mask) / (all of it)."""
        return self.losses(targets)[0]

    def losses(self, targets: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The token term (as :meth:`loss`) and the pixel term: mean over layers, targets and pixels
        of the binary cross-entropy of the word's attention probability against its object's mask
        (area-pooled to the layer's resolution)."""
        self.emb = None
        probs, self.probs = self.probs, []
        if not targets or not probs:
            zero = torch.zeros((), device=probs[0].device if probs else "cpu")
            return zero, zero
        b_idx = torch.tensor([b for b, _, _ in targets])
        t_idx = torch.tensor([t for _, t, _ in targets])
        masks = torch.from_numpy(np.stack([m for _, _, m in targets]).astype(np.float32))[:, None]
        terms, pixel = [], []
        for p in probs:
            side = int(round(p.shape[1] ** 0.5))
            m = torch.nn.functional.adaptive_avg_pool2d(masks, side).flatten(1).to(p.device)  # (K, hw)
            a = p[b_idx.to(p.device), :, t_idx.to(p.device)]  # (K, hw)
            terms.append(1 - (a * m).sum(1) / a.sum(1).clamp_min(1e-8))
            pixel.append(torch.nn.functional.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), m))
        return torch.stack(terms).mean(), torch.stack(pixel).mean()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac``; a run continued with
    ``--init-from`` warms up again (its optimizer state is new) towards the cosine value."""
    frac = max(0, step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
    since = step - (args.init_step if args.init_from else 0)
    return cosine * min(1.0, (since + 1) / args.warmup)


def ema_pipeline(pipe, ema_unet, ema_text):
    """The pipeline with EMA weights (shares tokenizer, VAE and scheduler config)."""
    from diffusers import StableDiffusionPipeline

    out = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=ema_text, tokenizer=pipe.tokenizer, unet=ema_unet,
        scheduler=pipe.scheduler.__class__.from_config(pipe.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    out.set_progress_bar_config(disable=True)
    return out


def probe_scenes(seed: int, per_count: int, image_size: int) -> list:
    """The probe set of the run's world (v2: held-out seeds and captions)."""
    if WORLD["world"] == "v1":
        return v1_probe_scenes(seed, per_count, image_size)
    return rich_probe_scenes(seed, per_count, image_size)


def do_probe(pipe, args: argparse.Namespace, step: int, log: Log) -> dict[str, float]:
    scenes = probe_scenes(args.seed, args.probe_per_count, args.image_size)
    t0 = time.time()
    res = run_word_probe(pipe, [s.caption for s in scenes], seed=args.seed, steps=args.probe_steps,
                         guidance_scale=args.probe_guidance, image_size=args.image_size)
    Image.fromarray(probe_grid(res)).save(args.out / f"probe_{step:06d}.png")
    metrics = {"step": step, **res.metrics, "seconds": time.time() - t0}
    log("probe " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                            if not k.startswith(("mass_", "word_")) or k in ("mass_word", "mass_eot_pad")))
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = args.device
    WORLD.update(world=args.world)
    if args.world == "v2":
        WORLD.update(synonym_p=args.synonym_p, hypernym_p=args.hypernym_p, bare_p=args.bare_p,
                     overlap_p=args.overlap_p)
    device = torch.device(args.device)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    ckpt_path = args.out / "ckpt.pt"
    vae_path = args.out / "vae.pt"
    if ckpt_path.exists() and not args.resume:
        raise SystemExit(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")
    log(f"args {vars(args)}")

    pipe = build_toy_pipeline(
        seed=args.seed, tokenizer_path=args.tokenizer, text_hidden=args.text_hidden, text_layers=args.text_layers,
        unet_channels=tuple(int(c) for c in args.unet_channels.split(",")), unet_layers_per_block=args.unet_layers,
        unet_heads=args.unet_heads, image_size=args.image_size,
    )
    pipe.set_progress_bar_config(disable=True)
    counts = parameter_counts(pipe)
    log(f"parameters {counts}")
    vae, unet, text = pipe.vae, pipe.unet, pipe.text_encoder

    continued = None
    if args.init_from is not None and not (args.resume and ckpt_path.exists()):
        from ovstore.toyworld.model import load_toy_pipeline

        init = load_toy_pipeline(args.init_from)
        for name in ("unet", "text_encoder", "vae"):
            getattr(pipe, name).load_state_dict(getattr(init, name).state_dict())
        previous = args.init_from / "training.json"
        before = json.loads(previous.read_text()) if previous.exists() else {}
        continued = {"pipeline": str(args.init_from), "step": args.init_step,
                     "note": "weights of that pipeline (EMA, stored in float16) as live and EMA weights; "
                             f"fresh AdamW state warmed up over {args.warmup} steps; autoencoder kept"}
        if before.get("autoencoder"):
            atomic_torch_save({"state": pipe.vae.state_dict(), "stats": before["autoencoder"]}, vae_path)
        log(f"initialised from {args.init_from} at step {args.init_step}")

    # Stage 1: autoencoder (skipped when its result is on disk).
    if args.vae_from is not None and not vae_path.exists():
        import shutil

        shutil.copyfile(args.vae_from, vae_path)
        log(f"autoencoder copied from {args.vae_from}")
    if (args.resume or continued or args.vae_from is not None) and vae_path.exists():
        saved = torch.load(vae_path, weights_only=False, map_location="cpu")
        vae.load_state_dict(saved["state"])
        vae_stats = saved["stats"]
        log(f"loaded autoencoder from {vae_path}")
    else:
        vae_stats = train_vae(vae, args, log)
        atomic_torch_save({"state": vae.state_dict(), "stats": vae_stats}, vae_path)
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=vae_stats["scaling_factor"])
    sf = vae_stats["scaling_factor"]
    pipe.to(device)

    # Stage 2: diffusion.
    text.requires_grad_(not args.freeze_text)
    params = [p for p in list(unet.parameters()) + list(text.parameters()) if p.requires_grad]
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr_scale": 1.0},
              {"params": [p for p in text.parameters() if p.requires_grad], "lr_scale": args.text_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=args.weight_decay)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text).eval().requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    live_params = list(unet.parameters()) + list(text.parameters())
    alphas = pipe.scheduler.alphas_cumprod.float().to(device)
    grounder = Grounder(unet) if args.ground_weight > 0 or args.pixel_weight > 0 else None
    tok = pipe.tokenizer
    token_cache: dict[str, torch.Tensor] = {}

    def tokenize(captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in token_cache]
        if missing:
            ids = tok(missing, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            token_cache.update(zip(missing, ids))
        return torch.stack([token_cache[c] for c in captions]).to(device)

    start, elapsed, history, probes = 0, 0.0, [], []
    recipe: list[dict] = []  # the settings in force from each step on (a resume may change them)
    if continued is not None:
        start = args.init_step
        elapsed = float(before.get("seconds_diffusion") or 0.0)
        history, probes = list(before.get("loss_history", [])), list(before.get("probes", []))
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=device)
        continued = ck.get("continued")
        unet.load_state_dict(ck["unet"])
        text.load_state_dict(ck["text"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_text.load_state_dict(ck["ema_text"])
        opt.load_state_dict(ck["opt"])
        start, elapsed, history, probes = ck["step"], ck["elapsed"], ck["history"], ck["probes"]
        recipe = list(ck.get("recipe", []))
        if not recipe and (args.out / "training.json").exists():  # a checkpoint from before recipes were kept
            info = json.loads((args.out / "training.json").read_text())
            recipe = [r for r in info.get("recipe", []) if r["from_step"] < start]  # a record written past it
            if not recipe:
                old = info.get("hyperparameters", {})
                recipe = [{"from_step": 0, "hyperparameters": {k: v for k, v in old.items() if k not in _NOT_RECIPE}}]
        log(f"resumed at step {start}")
    now = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in _NOT_RECIPE}
    if not recipe or {k: v for k, v in recipe[-1]["hyperparameters"].items()} != now:
        # a resume with other settings continues the run under a new recipe: keep the record
        recipe.append({"from_step": start, "hyperparameters": now})
        if len(recipe) > 1:
            old = recipe[-2]["hyperparameters"]
            log("recipe changed at step " + str(start) + ": "
                + ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in now.items() if old.get(k) != v))

    def record(finished: bool) -> None:
        info = {
            "finished": finished, "steps": step_done, "batch": args.batch, "seconds_diffusion": elapsed,
            "steps_per_second": step_done / elapsed if elapsed else None, "seed": args.seed,
            "hardware": hardware(),
            "hyperparameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "recipe": recipe, "parameters": counts, "autoencoder": vae_stats, "loss_history": history,
            "probes": probes,
            "pipeline": str(args.out / "pipeline"), "continued_from": continued,
            "probe_captions": [sc.caption for sc in probe_scenes(args.seed, args.probe_per_count, args.image_size)],
        }
        folder = args.out / "pipeline"
        files = folder.rglob("*") if folder.exists() else []
        info["pipeline_bytes"] = sum(f.stat().st_size for f in files if f.is_file()) or None
        atomic_json(info, args.out / "training.json")

    def checkpoint() -> None:
        atomic_torch_save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                           "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step_done,
                           "elapsed": elapsed, "history": history, "probes": probes, "continued": continued,
                           "recipe": recipe},
                          ckpt_path)
        save_toy_pipeline(ema_pipeline(pipe, ema_unet, ema_text), args.out / "pipeline")
        record(False)

    unet.train()
    text.train()
    step_done = start
    window_loss, window_ground, window_pixel, window_n, t_window = 0.0, 0.0, 0.0, 0, time.time()
    for step in range(start, args.steps):
        t_step = time.time()
        scenes = batch_scenes(args.seed, 2, step, args.batch, args.image_size)
        x = torch.from_numpy(scenes_to_array(scenes)).to(device)
        rng = np.random.default_rng([args.seed, 5, step])
        keep = [not (rng.random() < args.caption_dropout) for _ in scenes]
        if args.world == "v2" and (args.list_p > 0 or args.partial_p > 0):
            aug = np.random.default_rng([args.seed, 6, step])
            words = [training_words(sc, aug, args.list_p, args.partial_p) for sc in scenes]
        else:
            words = [caption_words(sc.caption, sc) for sc in scenes]
        captions = [words_caption(w) if k else "" for w, k in zip(words, keep)]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + 7 * step + 1)
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.mean * sf
        t = torch.randint(0, alphas.numel(), (args.batch,), generator=gen).to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        ids = tokenize(captions)
        emb = text(ids)[0]
        ctx_keep = None
        if args.unpadded_p > 0:
            cut = torch.from_numpy(np.random.default_rng([args.seed, 8, step]).random(args.batch) < args.unpadded_p)
            eot = (ids == tok.eos_token_id).int().argmax(1).cpu()  # first end-of-text
            rows = torch.arange(ids.shape[1])[None]
            ctx_keep = (~cut[:, None] | (rows <= eot[:, None])).to(device)
        if grounder is not None:
            grounder.start(emb, ctx_keep)
        pred = unet(zt, t, emb, encoder_attention_mask=ctx_keep).sample
        per = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
        if args.snr_gamma > 0:
            snr = alphas[t] / (1 - alphas[t])
            per = per * torch.clamp(snr, max=args.snr_gamma) / snr
        loss = per.mean()
        ground = None
        if grounder is not None:
            ground, pixel = grounder.losses(grounding_targets(words, scenes, tok, keep))
            loss = loss + args.ground_weight * ground + args.pixel_weight * pixel
            window_pixel += pixel.item()
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        step_done = step + 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.time() - t_step
        window_loss += loss.item()
        window_ground += ground.item() if ground is not None else 0.0
        window_n += 1
        if step_done % args.log_every == 0 or step_done == args.steps:
            rate = window_n / (time.time() - t_window)
            entry = {"step": step_done, "loss": window_loss / window_n, "lr": lr, "steps_per_s": rate}
            if grounder is not None:
                entry["ground"] = window_ground / window_n
            if args.pixel_weight > 0:
                entry["pixel"] = window_pixel / window_n
            history.append(entry)
            log(f"step {step_done} loss {window_loss / window_n:.4f} "
                + (f"ground {window_ground / window_n:.4f} " if grounder is not None else "")
                + (f"pixel {window_pixel / window_n:.4f} " if args.pixel_weight > 0 else "")
                + f"lr {lr:.2e} {rate:.2f} steps/s elapsed {elapsed / 60:.1f} min")
            window_loss, window_ground, window_pixel, window_n = 0.0, 0.0, 0.0, 0
        probe_now = step_done % args.probe_every == 0 or step_done == args.steps
        if step_done % args.ckpt_every == 0 or step_done == args.steps or probe_now:
            checkpoint()
            log(f"checkpoint at step {step_done}")
        if probe_now:
            try:
                probes.append(do_probe(ema_pipeline(pipe, ema_unet, ema_text), args, step_done, log))
            except Exception as exc:  # a failed probe must not end a long run; it is logged and recorded
                log(f"PROBE FAILED at step {step_done}: {type(exc).__name__}: {exc}")
                probes.append({"step": step_done, "error": f"{type(exc).__name__}: {exc}"})
            checkpoint()  # again, so that the checkpoint holds this probe
        if probe_now or step_done % args.log_every == 0:
            t_window = time.time()

    if start >= args.steps:
        log(f"nothing to do: checkpoint is at step {start} >= --steps {args.steps}")
    step_done = max(start, args.steps)
    save_toy_pipeline(ema_pipeline(pipe, ema_unet, ema_text), args.out / "pipeline")
    record(True)
    log(f"done: pipeline in {args.out / 'pipeline'}")


if __name__ == "__main__":
    main()
