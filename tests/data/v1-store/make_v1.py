"""Writes tests/data/v1-store with the format-v1 code (main at 08e2b3d)."""
import json, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
from ovstore.analyze import compute_maps
from ovstore.selection import LayerSelection
out = Path("tests/data/v1-store")
pipe, identity = load_pipeline("tests/data/golden/tiny-sd15")
requests = build_requests([("a cat on a sofa", None, 3), ("a red car in the street", "blurry", 4)], guidance=7.5, num_inference_steps=2)
config = CaptureConfig(num_inference_steps=2, guidance=7.5, dtype="float32", branch="both", calls="0,-1")
capture(pipe, identity, requests, out / "store.zarr", config=config)
m = compute_maps(out / "store.zarr", ["a cat and a sofa", "car"])
np.save(out / "maps.npy", m.values)
mc = compute_maps(out / "store.zarr", ["a cat and a sofa"], config=__import__("ovstore.analyze", fromlist=["MapConfig"]).MapConfig(branch="cond"))
np.save(out / "maps_cond.npy", mc.values)
(out / "README.md").write_text("A format-v1 store written by ovstore at commit 08e2b3d (before model families): tiny-sd15,\n"
 "two images (seeds 3 and 4), 2 steps (3 UNet calls, the first and last stored), guidance 7.5, branches uncond+cond, float32.\n"
 "maps.npy: compute_maps(store, ['a cat and a sofa', 'car']) (default branch uncond);\n"
 "maps_cond.npy: compute_maps(store, ['a cat and a sofa'], config=MapConfig(branch='cond')).\n"
 "Both computed by that commit when the store was written. Recreate with scripts in git history only.\n")
print(m.shape, mc.shape)
