"""Run the training probe (``ovstore.toyworld.probe.run_word_probe``) on a saved toy-world pipeline.

    python scripts/probe_toyworld.py PIPELINE_DIR [--seed 0] [--per-count 8]

The same held-out captions, seeds and settings as ``scripts/train_toyworld.py``'s probe at every
checkpoint (guidance 3, 20 steps), so that a checkpoint saved before a figure was added to the
probe can be measured the same way. Prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the training run's --seed")
    parser.add_argument("--per-count", type=int, default=8, help="the training run's --probe-per-count")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from ovstore.toyworld.model import load_toy_pipeline
    from ovstore.toyworld.probe import rich_probe_scenes, run_word_probe

    torch.set_num_threads(args.threads)
    pipe = load_toy_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    scenes = rich_probe_scenes(args.seed, args.per_count, 32)
    res = run_word_probe(pipe, [s.caption for s in scenes], seed=args.seed, steps=20, guidance_scale=3.0,
                         image_size=32)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.metrics.items()}))


if __name__ == "__main__":
    main()
