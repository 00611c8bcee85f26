"""MM-DiT storage presets on the tiny SD3 and FLUX pipelines: the blocks and calls each keeps,
bytes that scale with them, the bytes printed before capture, UNet presets refused on MM-DiT
(and MM-DiT presets on UNets), and maps asking for what a preset dropped refused in one line."""

from __future__ import annotations

import pytest

from conftest import DATA, TINY_SD15

PIPELINES = {"sd3": DATA / "online" / "sd3" / "pipeline", "flux": DATA / "online" / "flux" / "pipeline"}
GUIDANCE = {"sd3": 4.0, "flux": 3.5}
#: preset -> (joint/double blocks kept of the tiny SD3's 3, of the tiny FLUX's 2; calls kept of 4)
EXPECTED = {
    "full": ((3, 2), (0, 1, 2, 3)),
    "half-calls": ((3, 2), (0, 2)),
    "first-two-thirds": ((2, 2), (0, 1, 2, 3)),
    "first-half": ((2, 1), (0, 1, 2, 3)),
    "first-half-half-calls": ((2, 1), (0, 2)),
}


@pytest.fixture(scope="module")
def pipes():
    from ovstore.capture import load_pipeline

    return {name: load_pipeline(str(path)) for name, path in PIPELINES.items()}


def _plan(pipe_and_identity, family, **settings):
    from ovstore.capture import CaptureConfig, plan_capture

    pipe, identity = pipe_and_identity
    config = CaptureConfig(num_inference_steps=4, guidance=GUIDANCE[family], height=64, width=64, branch="cond",
                           **settings)
    return plan_capture(pipe, identity, config)[0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_presets_keep_first_blocks_and_calls(pipes, family):
    from ovstore.families import family_for_pipeline

    assert set(family_for_pipeline(pipes[family][0]).presets) == set(EXPECTED)
    full = _plan(pipes[family], family)
    per_block_call = full.query_bytes_per_image() / (len(full.layers) * full.n_steps)
    for preset, (blocks, calls) in EXPECTED.items():
        layout = _plan(pipes[family], family, preset=preset)
        n = blocks[0 if family == "sd3" else 1]
        # the first blocks, in order: later blocks' text streams need every block before them
        assert [l.name for l in layout.layers] == [f"transformer_blocks.{i}.attn" for i in range(n)]
        assert all(l.block != "single" for l in layout.layers)
        assert layout.calls == calls and layout.extra["preset"] == preset
        # queries, image keys, values and temb all scale with blocks x calls
        assert layout.query_bytes_per_image() == pytest.approx(per_block_call * n * len(calls), rel=0.02)
    # naming layers replaces the preset's block choice (and the calls preset still applies)
    from ovstore.selection import LayerSelection

    layout = _plan(pipes[family], family, preset="first-half-half-calls",
                   layers=LayerSelection(patterns=("transformer_blocks.[0-1].attn",)))
    assert len(layout.layers) == 2 and layout.calls == (0, 2)


def test_presets_that_do_not_apply_to_a_family_are_refused(pipes):
    from ovstore.capture import CaptureConfig, load_pipeline, plan_capture
    from ovstore.errors import InvalidInputError

    for family in ("sd3", "flux"):
        for preset in ("no-finest", "thin", "thin-half-calls", "no-finest-half-calls"):
            with pytest.raises(InvalidInputError, match=rf"--preset {preset} does not apply to the {family} "
                                                        r"family .*choose one of full, half-calls, first-two-thirds"):
                _plan(pipes[family], family, preset=preset)
    sd, identity = load_pipeline(str(TINY_SD15))
    with pytest.raises(InvalidInputError, match="--preset first-half does not apply to the unet family"):
        plan_capture(sd, identity, CaptureConfig(num_inference_steps=2, preset="first-half"))


def test_cli_prints_preset_bytes_before_capture_and_refuses_dropped_blocks(tmp_path, monkeypatch, capsys):
    """The size printed before capture is the preset's (half the full one for half-calls on
    one block of two); asking maps for a block the preset dropped is one line naming the preset."""
    from typer.testing import CliRunner

    from ovstore.cli import _human, app
    from ovstore.store import open_store

    runner = CliRunner()
    out = tmp_path / "first-half.zarr"
    result = runner.invoke(app, ["capture", str(PIPELINES["flux"]), "--prompt", "a cup of coffee", "--steps", "2",
                                 "--guidance", "3.5", "--height", "64", "--width", "64", "--branch", "cond",
                                 "--max-sequence-length", "16", "--dtype", "float32", "--preset", "first-half",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    layout = open_store(out).layout
    assert [l.name for l in layout.layers] == ["transformer_blocks.0.attn"] and layout.extra["preset"] == "first-half"
    printed = " ".join(result.output.split())
    size = f"about {_human(layout.query_bytes_per_image() + layout.context_bytes_per_image())} per image"
    assert size in printed
    assert printed.index(size) < printed.index("images 0 in")  # before the capture's report
    from ovstore.cli import main

    monkeypatch.setattr("sys.argv", ["ovstore", "maps", str(out), "--attribution", "cup", "--layer",
                                     "transformer_blocks.1.attn", "--out", str(tmp_path / "m.npy")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error:") and "matches no" in err
    assert "--preset first-half, which does not store the others" in err and "--preset full" in err
    assert not (tmp_path / "m.npy").exists()
