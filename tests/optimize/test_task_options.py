"""``ovstore.optimize.tasks_from_options``: the classes of ``optimize``'s options (a tasks file
or --image/--mask pairs) with the CLI's one-line errors, for Python users without the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture()
def masks(tmp_path):
    from PIL import Image

    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    lines = [{"init": "cat", "images": [0], "masks": ["m.png"]}, {"init": "sofa", "images": [0], "masks": ["m.png"],
                                                                   "name": "couch"}]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    return tmp_path


def test_one_class_from_image_and_mask_pairs(golden_store, masks):
    from ovstore.optimize import TokenTask, tasks_from_options

    request = tasks_from_options(golden_store, masks / "cat.safetensors", images=[0], masks=[masks / "m.png"],
                                 init="cat", name="kitty")
    assert request.tasks == (TokenTask("cat", (0,), (masks / "m.png",), name="kitty"),)
    assert not request.folder and request.out == masks / "cat.safetensors"
    assert set(request.inputs) == {Path(golden_store), masks / "m.png"}


def test_classes_of_a_tasks_file(golden_store, masks):
    from ovstore.optimize import tasks_from_options

    request = tasks_from_options(golden_store, masks / "tokens", tasks_file=masks / "tasks.jsonl")
    assert [t.label for t in request.tasks] == ["cat", "couch"] and request.folder
    assert set(request.inputs) == {Path(golden_store), masks / "tasks.jsonl", masks / "m.png"}


def test_bad_options_are_the_cli_errors(golden_store, masks):
    from ovstore.errors import InvalidInputError
    from ovstore.optimize import tasks_from_options

    tasks, pair = masks / "tasks.jsonl", dict(images=[0], masks=[masks / "m.png"], init="cat")
    cases = [
        (dict(out=masks / "t", tasks_file=tasks, images=[0]), "--tasks-file names every class; drop --image"),
        (dict(out=masks / "t.safetensors", tasks_file=tasks), "with --tasks-file, give a folder"),
        (dict(out=masks / "t.safetensors", images=[0], masks=[masks / "m.png"]), "give --init WORD with --image"),
        (dict(out=masks / "t.pt", **pair), "a token file must end in .safetensors"),
        (dict(out=masks / "t.safetensors", images=[0, 1], masks=[masks / "m.png"], init="cat"),
         "give one --mask per --image"),
        (dict(out=masks, tasks_file=tasks), "contains"),  # the folder of the masks: an input
        (dict(out=Path(golden_store) / "t.safetensors", **pair), "an input of this command"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidInputError, match=message) as info:
            tasks_from_options(golden_store, **kwargs)
        assert "\n" not in str(info.value)
    # an earlier token is refused before any training, unless overwrite is given
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token

    token = optimize_tokens(golden_store, [TokenTask("cat", (0,), (masks / "m.png",))], config=OptimizeConfig(epochs=1))[0]
    save_token(token, masks / "old.safetensors")
    with pytest.raises(InvalidInputError, match="add --overwrite"):
        tasks_from_options(golden_store, masks / "old.safetensors", **pair)
    assert tasks_from_options(golden_store, masks / "old.safetensors", overwrite=True, **pair).tasks
