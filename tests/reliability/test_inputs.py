"""Careless inputs that must work (a byte-order mark, Windows line ends, blank lines) and the
checks behind the bad-input table that need more than one command line: memory estimates,
the layout checksum, version advice, deprecated spellings and the help text."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import zarr

from ovstore.cli import main
from ovstore.errors import InvalidInputError, StoreDamagedError, StoreFormatError

from test_bad_input import TINY, digest, run_cli  # tests/reliability is on sys.path (rootdir-relative imports)

BOM = "\ufeff".encode()


def run_ok(monkeypatch, capsys, *args) -> tuple[str, str]:
    monkeypatch.setattr(sys, "argv", ["ovstore", *map(str, args)])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    captured = capsys.readouterr()
    return captured.out, captured.err


# ---------------------------------------------------------------------- text files
def test_bom_and_crlf_never_reach_a_prompt(tmp_path):
    from ovstore.capture import read_prompts_file

    clean = tmp_path / "clean.txt"
    clean.write_text('a cat on a sofa\n{"prompt": "a dog", "seed": 4}\n')
    notepad = tmp_path / "notepad.txt"
    notepad.write_bytes(BOM + b'a cat on a sofa\r\n{"prompt": "a dog", "seed": 4}\r\n')
    old_mac = tmp_path / "mac.txt"
    old_mac.write_bytes(b'a cat on a sofa\r{"prompt": "a dog", "seed": 4}\r')
    expected = [("a cat on a sofa", None, None), ("a dog", None, 4)]
    assert read_prompts_file(clean) == read_prompts_file(notepad) == read_prompts_file(old_mac) == expected


def test_bom_prompt_is_stored_without_it(tiny_pipe, monkeypatch, capsys, tmp_path):
    """The whole command: the recorded prompt (which the pipeline tokenizes) has no BOM."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(BOM + b"a cat\r\n")
    out = tmp_path / "s.zarr"
    run_ok(monkeypatch, capsys, "capture", TINY, "--prompts-file", prompts, "--steps", "2",
           "--reserve-only", "--out", out)
    from ovstore.store import open_store

    assert open_store(out).record(0).prompt == "a cat"


def test_line_numbers_are_those_of_the_file(tmp_path):
    """Only \\n ends a line: a form feed or a Unicode line separator inside a line does not
    shift the numbers that errors name."""
    from ovstore.capture import read_prompts_file

    path = tmp_path / "p.jsonl"
    path.write_text('a cat\x0cand a dog\n{"prompt": "x"}\u2028\n{"prompt": 3}\n', encoding="utf-8")
    with pytest.raises(InvalidInputError, match="line 3"):
        read_prompts_file(path)


def test_blank_lines_of_an_attributions_file_keep_their_line_numbers(multi_store, monkeypatch, capsys, tmp_path):
    import xarray as xr

    path = tmp_path / "attributions.txt"
    path.write_bytes(BOM + b"a cat\r\n\r\n# furniture next\r\na sofa\r\n\r\n")
    out = tmp_path / "m.zarr"
    before = digest(multi_store)
    run_ok(monkeypatch, capsys, "maps", multi_store, "--attributions-file", path, "-a", "a dog", "--out", out)
    maps = xr.open_zarr(out, consolidated=False)["ovam_maps"].load()
    lines = {str(p): int(l) for p, l in zip(maps["prompt"].values, maps["prompt_line"].values)}
    assert lines == {"a cat": 1, "a sofa": 4, "a dog": -1}  # -1: given with --attribution
    direct = tmp_path / "d.zarr"
    run_ok(monkeypatch, capsys, "maps", multi_store, "-a", "a cat", "-a", "a sofa", "-a", "a dog", "--out", direct)
    expected = xr.open_zarr(direct, consolidated=False)["ovam_maps"].load()
    for prompt in ("a cat", "a sofa", "a dog"):  # the same tokens (no BOM, no \r), the same maps
        got, want = (m.isel(token=m.prompt.values == prompt) for m in (maps, expected))
        assert list(got.token_str.values) == list(want.token_str.values)
        np.testing.assert_allclose(got.values, want.values, rtol=1e-6)  # other prompt blocks: float rounding
    assert "prompt_line" not in expected.coords and digest(multi_store) == before


def test_names_files_and_labelmaps_with_bom_and_crlf(tmp_path):
    from ovstore.inputs import parse_names, read_names_file
    from ovstore.label.voc import read_labelmap, write_labelmap

    classes = tmp_path / "classes.txt"
    classes.write_bytes(BOM + b"cat\r\n# pets above\r\ndog\r\n\r\n\r\n")
    assert read_names_file(classes, "--classes-file") == ("cat", "dog")
    assert parse_names(" cat, dog ", "--classes") == ("cat", "dog")
    labelmap = tmp_path / "labelmap.txt"
    write_labelmap(labelmap, ["cat", "dog"])
    saved = tmp_path / "notepad_labelmap.txt"
    saved.write_bytes(BOM + labelmap.read_bytes().replace(b"\n", b"\r\n"))
    assert read_labelmap(saved) == read_labelmap(labelmap) == ["background", "cat", "dog"]


def test_tasks_file_with_bom_and_crlf(tmp_path):
    from ovstore.optimize import read_tasks_file

    path = tmp_path / "tasks.jsonl"
    path.write_bytes(BOM + b'{"init": "cat", "images": [0], "masks": ["m.png"]}\r\n\r\n')
    (task,) = read_tasks_file(path)
    assert task.init_word == "cat" and task.masks == (tmp_path / "m.png",)


# ---------------------------------------------------------------------- numbers
def test_numeric_checks_name_the_valid_range():
    from ovstore.inputs import check_float, check_int, check_seed

    assert check_int(np.int64(3), "--x", 1, 5) == 3
    with pytest.raises(InvalidInputError, match=r"--x 9 is out of range; valid: 1 <= value <= 5"):
        check_int(9, "--x", 1, 5)
    with pytest.raises(InvalidInputError, match="must be an integer"):
        check_int(True, "--x", 0)
    with pytest.raises(InvalidInputError, match=r"valid: > 0"):
        check_float(0.0, "--lr", 0.0, low_open=True)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match="finite"):
            check_float(bad, "--guidance", 0.0)
    assert check_seed(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, 1.5, "3"):
        with pytest.raises(InvalidInputError):
            check_seed(bad)


def test_zero_step_slices_are_refused_everywhere():
    from ovstore.analyze import MapConfig
    from ovstore.capture import CaptureConfig
    from ovstore.selection import parse_index_spec, resolve_indices

    for spec in ("0:10:0", "::0", " 1 : 5 : 0 "):
        with pytest.raises(InvalidInputError, match="step 0"):
            parse_index_spec(spec)
    with pytest.raises(InvalidInputError, match="step 0"):
        MapConfig(steps="::0")
    with pytest.raises(InvalidInputError, match="step 0"):
        CaptureConfig(calls="0:4:0")
    assert resolve_indices(parse_index_spec("::-2"), 5) == [0, 2, 4]
    with pytest.raises(InvalidInputError, match="integers"):
        parse_index_spec([0, "x"])


def test_a_seed_out_of_range_leaves_no_store(tiny_pipe, tmp_path):
    """Python API: the request is refused before the store is created (no empty store left)."""
    from ovstore.capture import CaptureConfig, capture
    from ovstore.store.format import ImageRecord

    out = tmp_path / "s.zarr"
    with pytest.raises(InvalidInputError, match="out of range"):
        capture(*tiny_pipe, [ImageRecord("a cat", seed=2**64, num_inference_steps=2, guidance=7.5)], out,
                config=CaptureConfig(num_inference_steps=2))
    assert list(tmp_path.iterdir()) == []


def test_maps_too_large_for_memory_are_refused_before_allocating(multi_store, monkeypatch, capsys, tmp_path):
    """The .npy output is held in memory: an estimate above the available memory is refused
    naming the estimate and .zarr, which streams; .zarr of the same maps works."""
    import ovstore.inputs

    monkeypatch.setattr(ovstore.inputs, "available_memory", lambda: 25 * 10**5)  # 2.5 MB free: one image's maps fit
    before = digest(tmp_path)
    line = run_cli(monkeypatch, capsys, "maps", multi_store, "-a", "a cat", "--size", "256", "256",
                   "--out", tmp_path / "m.npy")
    # 3 images x 4 tokens x 256 x 256 x 4 bytes
    assert "would take about 3.1 MB of memory" in line and "FILE.zarr" in line and digest(tmp_path) == before
    run_ok(monkeypatch, capsys, "maps", multi_store, "-a", "a cat", "--size", "256", "256", "--out", tmp_path / "m.zarr")
    from ovstore.analyze import MapConfig, compute_maps

    with pytest.raises(InvalidInputError, match="smaller --size"):
        compute_maps(multi_store, ["a cat"], config=MapConfig(size=(2048, 2048)))


def test_capture_too_large_for_memory_leaves_no_store(tiny_pipe, monkeypatch, tmp_path):
    import ovstore.inputs
    from ovstore.capture import CaptureConfig, build_requests, capture

    monkeypatch.setattr(ovstore.inputs, "available_memory", lambda: 10**5)
    with pytest.raises(InvalidInputError, match=r"queries of one batch \(1 images of 64x64\) would take about 9\d\d\.\d KB"):
        capture(*tiny_pipe, build_requests([("a cat", None, 0)], num_inference_steps=2), tmp_path / "s.zarr",
                config=CaptureConfig(num_inference_steps=2))
    assert list(tmp_path.iterdir()) == []


def test_mask_arrays_are_checked():
    from ovstore.optimize.masks import load_mask

    soft = np.zeros((8, 8), np.float32)
    soft[2:5, 2:5] = 0.9
    assert load_mask(soft, (8, 8)).sum() == 9
    for bad, message in [(np.where(soft > 0, np.nan, 0.0), "NaN or Inf"), (soft - 1, "negative"),
                         (soft.astype(complex), "dtype complex128")]:
        with pytest.raises(InvalidInputError, match=message):
            load_mask(bad, (8, 8))


# ---------------------------------------------------------------------- store metadata
def _edit_meta(path, edit) -> None:
    group = zarr.open_group(path, mode="r+")
    meta = json.loads(json.dumps(group.attrs["ovstore"]))
    edit(meta)
    group.attrs["ovstore"] = meta


def test_layout_edits_are_damage_and_older_stores_still_open(multi_store, monkeypatch, capsys, tmp_path):
    from ovstore.store import open_store, verify_store
    from ovstore.store.format import LAYOUT_CHECKSUM

    edited = tmp_path / "edited.zarr"
    shutil.copytree(multi_store, edited)
    scale = open_store(edited).layers[2].scale
    _edit_meta(edited, lambda m: m["layout"]["layers"][2].__setitem__("scale", scale * 2))
    with pytest.raises(StoreDamagedError, match="does not match its checksum"):
        open_store(edited)
    monkeypatch.setattr(sys, "argv", ["ovstore", "verify", str(edited)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and err[0].startswith("damaged:")
    # restoring the value restores the store: the checksum is of the content, not the file
    _edit_meta(edited, lambda m: m["layout"]["layers"][2].__setitem__("scale", scale))
    assert verify_store(open_store(edited)).ok

    older = tmp_path / "older.zarr"  # as written before the checksum existed
    shutil.copytree(multi_store, older)
    _edit_meta(older, lambda m: m.pop(LAYOUT_CHECKSUM))
    report = verify_store(open_store(older))
    assert report.ok and any("no metadata checksum (older store)" in n for n in report.notes)
    assert not any("older store" in n for n in verify_store(open_store(multi_store)).notes)


def test_layer_attributes_that_disagree_with_the_layout_are_reported(multi_store, tmp_path):
    from ovstore.store import open_store, verify_store

    copy = tmp_path / "copy.zarr"
    shutil.copytree(multi_store, copy)
    name = open_store(copy).layers[0].name
    group = zarr.open_group(copy / "layers" / name, mode="r+")
    group.attrs["layer"] = {**group.attrs["layer"], "head_dim": 1}
    report = verify_store(open_store(copy))
    assert [(p.array, p.kind) for p in report.problems] == [(f"layers/{name}", "metadata mismatch")]


@pytest.mark.parametrize("version,error,message", [
    ("1", StoreDamagedError, "not an integer"),
    (1.5, StoreDamagedError, "not an integer"),
    (None, StoreDamagedError, "not an integer"),
    (0, StoreFormatError, r"older than this ovstore reads \(versions 1, 2\); open it with the ovstore that wrote it"),
    (7, StoreFormatError, r"newer than this ovstore reads \(versions 1, 2\); upgrade ovstore"),
])
def test_version_advice(multi_store, tmp_path, version, error, message):
    from ovstore.store import open_store

    copy = tmp_path / "copy.zarr"
    shutil.copytree(multi_store, copy)
    _edit_meta(copy, lambda m: m.__setitem__("format_version", version))
    with pytest.raises(error, match=message) as info:
        open_store(copy)
    assert "upgrade" not in str(info.value) or version == 7


# ---------------------------------------------------------------------- command line
def test_deprecated_steps_is_calls_with_a_note(multi_store, monkeypatch, capsys, tmp_path):
    out, err = run_ok(monkeypatch, capsys, "maps", multi_store, "-a", "a cat", "--steps", "0:2", "--out", tmp_path / "a.npy")
    assert "is deprecated, use --calls" in err
    out, err = run_ok(monkeypatch, capsys, "maps", multi_store, "-a", "a cat", "--calls", "0:2", "--out", tmp_path / "b.npy")
    assert "is deprecated" not in err
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    full = tmp_path / "c.npy"
    run_ok(monkeypatch, capsys, "maps", multi_store, "-a", "a cat", "--out", full)
    assert not np.array_equal(np.load(full), np.load(tmp_path / "b.npy"))  # the selection is applied


@pytest.mark.parametrize("command", ["", "capture", "maps", "optimize", "label", "verify", "info", "evaluate", "demo"])
def test_switches_take_no_value_in_the_help(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "200")
    out, _ = run_ok(monkeypatch, capsys, *([command] if command else []), "--help")
    assert "--help" in out and "<bool>" not in out
    for switch in {"capture": ["--resume", "--reserve-only"], "label": ["--crf", "--adaptive", "--write-maps"],
                   "maps": ["--combine-tokens"]}.get(command, []):
        row = next(l for l in out.splitlines() if re.search(rf"{switch}\b", l) and "│" in l)
        assert re.search(rf"{switch}\s{{3,}}\S", row), row  # the help text follows, no type
    if command in ("maps", "optimize"):
        assert "--calls" in out and "(deprecated: use --calls)" in out


def test_info_prints_to_stdout(multi_store, monkeypatch, capsys):
    out, err = run_ok(monkeypatch, capsys, "info", multi_store)
    assert "3 complete" in out and "scale" in out and err == ""


def test_every_test_named_in_the_error_table_exists():
    """docs/errors.md names a test for each row; a renamed or deleted test must not leave a
    row pointing at nothing."""
    from pathlib import Path

    from test_bad_input import CASES

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "errors.md").read_text(encoding="utf-8")
    rows, in_error_table = [], False  # rows of the tables headed "| situation | ...", not the figures
    for line in text.splitlines():
        if not line.startswith("|"):
            in_error_table = False
        elif line.startswith("| situation"):
            in_error_table = True
        elif in_error_table and line.startswith("| "):
            rows.append(line)
    assert len(rows) >= 45
    cases = {c[0] for c in CASES}
    named = re.findall(r"T\[([^\]]+)\]", "\n".join(rows))
    assert named and not set(named) - cases, set(named) - cases
    files = {"I": "tests/reliability/test_inputs.py", "F": "tests/reliability/test_faults.py",
             "S": "tests/store/test_integrity.py"}
    for prefix, name in re.findall(r"\b([IFS])::(test_\w+)", text):
        assert f"def {name}(" in (root / files[prefix]).read_text(encoding="utf-8"), (prefix, name)
    for path, name in re.findall(r"`(?:tests/[\w/]+/)?(test_\w+\.py)::(test_\w+)`", text):
        source = next(root.joinpath("tests").rglob(path))
        assert f"def {name}(" in source.read_text(encoding="utf-8"), (path, name)
    # rows of the outputs table name cases of test_outputs.py::test_refused_outputs
    from test_outputs import REFUSED

    refused = {c[0] for c in REFUSED}
    for quoted in re.findall(r'\bcases? ((?:"[^"]+"(?:, )?)+)', text):
        for name in re.findall(r'"([^"]+)"', quoted):
            assert "..." in name or name in refused, name  # "... without --overwrite" names a family
    # and bare `test_name` (or `test_name[ids]`): in the two test files that table's introduction names
    outputs_tests = "".join((root / "tests" / "reliability" / f).read_text(encoding="utf-8")
                            for f in ("test_outputs.py", "test_output_properties.py"))
    for name in re.findall(r"(?<![:\w])`(test_\w+)(?:\[[^\]`]*\])?`", text):
        assert f"def {name}(" in outputs_tests, name
    for row in rows:
        assert re.search(r'T\[|::test_|\bcases? "|`test_\w+', row), row  # every row names its test
