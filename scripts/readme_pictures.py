"""Regenerate the README pictures (docs/demo/*.png) from a fresh `ovstore demo` run.

    python scripts/readme_pictures.py            # demo into a temporary folder, pictures copied
    python scripts/readme_pictures.py --out DIR  # keep the demo folder (or finish one there)

Runs the demo on the embedded model, copies the chosen pictures to docs/demo/, prints the
demo's wall time and the figures behind each README caption, and exits 1 when a caption's
claim no longer holds for these weights (each drawn word or token is higher, on average,
inside its object than outside): then rewrite the caption in README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "demo"

#: README picture <- the demo's picture, and the claim its caption makes
PICTURES = {
    "prompt_words.png": ("prompt_words/00000_p000.png", "every word of the prompt is higher inside its object"),
    "open_vocabulary.png": ("open_vocabulary/00000.png", "every synonym and hypernym is higher inside its object"),
    "learned_token.png": ("token/held_out.png", "the token is higher inside the circles of every held-out image"),
    "labels.png": ("dataset/preview.png", None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="demo folder to use (default: a temporary one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from ovstore.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        start = time.perf_counter()
        run_demo(out, device=args.device, log=print)
        seconds = time.perf_counter() - start
        figures = json.loads((out / "figures.json").read_text())
        DOCS.mkdir(parents=True, exist_ok=True)
        failed = []
        for name, (source, claim) in PICTURES.items():
            shutil.copyfile(out / source, DOCS / name)
            inside = figures["inside_outside"].get(source, {})
            text = ", ".join(f"{w} {a:.3f}/{b:.3f}" for w, (a, b) in inside.items())
            ok = claim is None or (inside and all(a > b for a, b in inside.values()))
            print(f"{name}: from {source}" + (f"; inside/outside: {text}" if text else ""))
            if claim is not None:
                print(f"  claim: {claim}: {'holds' if ok else 'FAILS: rewrite its caption in README.md'}")
            if not ok:
                failed.append(name)
        print("top-k IoU (flat map):", ", ".join(f"{k} {v['topk_iou']:.2f} ({v['flat']:.2f})"
                                              for k, v in figures["topk_iou"].items()))
        print("labels, IoU against the recovered masks:", ", ".join(f"{k} {v:.2f}"
                                                                   for k, v in figures["label_iou"].items()))
        print(f"demo wall time: {seconds:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
