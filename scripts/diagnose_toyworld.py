#!/usr/bin/env python
"""Why do some words of a toy-world model not localise? Per-word figures with ovstore's
default maps (queries of the unconditional half, mid block left out).

For each colour and shape word of v1 captions (``sample_scenes(SEED, N)``), generated with
20 DDIM steps at guidance 5: top-k IoU of its map against its object (recovered from the
generated image), how often its mean map is higher inside than outside, its share of the
attention inside/outside the object, the end-of-text + padding share inside/outside, and
top-k split by phrase (first vs later). Then, for the given colours, which token's map
localises the object best (the word's own token, a later token that the causal encoder
folded it into, end-of-text ...).

    python scripts/diagnose_toyworld.py [--model src/ovstore/data/toy-shapes] [--captions 72]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ovstore.toyworld.model import load_toy_pipeline  # noqa: E402
from ovstore.toyworld.probe import AttentionProbe, _phrase_word_positions, topk_iou  # noqa: E402
from ovstore.toyworld.world import COLORS, SHAPES, parse_phrases, recover_masks, sample_scenes  # noqa: E402


def generate(pipe, captions: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    tok = pipe.tokenizer
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    probe = AttentionProbe(pipe.unet, emb, 32, branch="uncond", include_mid=False)
    try:
        out = pipe(prompt_embeds=emb, negative_prompt=[""] * len(captions), num_inference_steps=20,
                   guidance_scale=5.0, height=32, width=32, generator=torch.Generator().manual_seed(seed),
                   output_type="np")
    finally:
        probe.remove()
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8), probe.maps.numpy(), ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="src/ovstore/data/toy-shapes")
    p.add_argument("--captions", type=int, default=72)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--carriers", default="green,yellow", help="colours whose carrying token is looked for")
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = load_toy_pipeline(args.model)
    tok = pipe.tokenizer
    stats: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    carriers, own_iou, best_iou = defaultdict(Counter), defaultdict(list), defaultdict(list)
    caps = [s.caption for s in sample_scenes(args.seed, args.captions)]
    for start in range(0, len(caps), 12):
        chunk = caps[start:start + 12]
        images, maps, ids = generate(pipe, chunk, args.seed + start)
        for j, cap in enumerate(chunk):
            masks = recover_masks(images[j], cap)
            names = tok.convert_ids_to_tokens(ids[j])
            eot = int((ids[j] == tok.eos_token_id).nonzero()[0])
            total = maps[j].sum(0)
            pad_share = maps[j, eot:].sum(0) / total
            for k, ((color, _, shape), (cpos, npos)) in enumerate(zip(parse_phrases(cap),
                                                                        _phrase_word_positions(tok, cap))):
                where = "first" if k == 0 else "later"
                for word, pos, truth in ((color, cpos, masks[color]), (shape, npos, masks[shape])):
                    if truth.sum() < 3:
                        continue
                    m = maps[j, pos].sum(0)
                    d = stats[word]
                    d["topk"].append(topk_iou(m, truth))
                    d["in_gt_out"].append(m[truth].mean() > m[~truth].mean())
                    d["share_in"].append((m / total)[truth].mean())
                    d["share_out"].append((m / total)[~truth].mean())
                    d["pad_in"].append(pad_share[truth].mean())
                    d["pad_out"].append(pad_share[~truth].mean())
                    d[where].append(topk_iou(m, truth))
                if color in args.carriers.split(",") and masks[color].sum() >= 3:
                    scores = [topk_iou(maps[j, t], masks[color]) for t in range(eot + 2)]
                    t = int(np.argmax(scores))
                    label = names[t] if t < eot else ("<eot>" if t == eot else "<pad>")
                    rel = "own" if t == cpos[0] else ("after" if t > cpos[0] else "before")
                    carriers[(color, where)][f"{label} ({rel})"] += 1
                    own_iou[(color, where)].append(scores[cpos[0]])
                    best_iou[(color, where)].append(scores[t])
    print("| word | n | top-k | mean in > out | own share in / out | eot+pad share in / out "
          "| top-k first / later phrase |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for w in COLORS + SHAPES:
        d = stats[w]
        f = lambda k: float(np.mean(d[k])) if d[k] else float("nan")  # noqa: E731
        print(f"| {w} | {len(d['topk'])} | {f('topk'):.2f} | {f('in_gt_out'):.2f} | {f('share_in'):.3f} / "
              f"{f('share_out'):.3f} | {f('pad_in'):.2f} / {f('pad_out'):.2f} | {f('first'):.2f} / {f('later'):.2f} |")
    print()
    print("| colour, phrase | own token top-k | best token top-k | best tokens (count) |")
    print("|---|---:|---:|---|")
    for key in sorted(carriers):
        top = ", ".join(f"{k} {v}" for k, v in carriers[key].most_common(4))
        print(f"| {key[0]}, {key[1]} | {np.mean(own_iou[key]):.2f} | {np.mean(best_iou[key]):.2f} | {top} |")


if __name__ == "__main__":
    main()
