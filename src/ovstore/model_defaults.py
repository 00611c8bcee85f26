"""Analysis defaults a model directory carries: ``ovstore_defaults.json`` beside ``model_index.json``.

A model's authors know which prompt template, threshold and normalisation label well on it; the
file says so, capture records it in the store (``ModelIdentity.analysis_defaults``), and
``ovstore label`` and ``ovstore maps --png`` use it for the options a user does not give. It is
read with the same resolution as the pipeline: a local directory, the embedded model's folder,
or a hub id through ``huggingface_hub`` (local cache first; offline and not cached: no
defaults). A file that is there but wrong is refused with one line naming the file, the key
and the fix, before anything is written.

Format 1::

    {"format": 1,
     "label": {"prompt_template": "a {}", "mode": "compete", "normalize": "max", "threshold": 0.45},
     "maps": {"normalize": "max"}}

``label`` keys are :class:`ovstore.label.LabelConfig` field names (those that describe the model,
not one labelling: see ``ovstore.label.MODEL_DEFAULT_SETTINGS``); ``maps.normalize`` is the
display normalisation of ``maps --png`` (``max`` or ``minmax``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InvalidInputError
from .store import AnalysisDefaults

__all__ = [
    "DEFAULTS_FILE",
    "DEFAULTS_FORMAT",
    "DISPLAY_NORMALIZATIONS",
    "OVSTORE_DISPLAY_NORMALIZE",
    "parse_model_defaults",
    "read_defaults_file",
    "read_model_defaults",
]

DEFAULTS_FILE = "ovstore_defaults.json"
DEFAULTS_FORMAT = 1
#: ``maps.normalize``: how a map is brought to [0, 1] for display (``max``: divided by its
#: maximum, the reference's display convention; ``minmax``: its floor made 0 as well, for models
#: whose maps have a high floor). Without one (ovstore's default, None) maps are drawn unchanged,
#: on one scale per sheet (``ovstore.pictures``: a word's share of each pixel's attention), so
#: that a word weak everywhere looks weak instead of being stretched to full range.
DISPLAY_NORMALIZATIONS = ("max", "minmax")
OVSTORE_DISPLAY_NORMALIZE = None
_SECTIONS = ("format", "label", "maps")


def parse_model_defaults(data: Any, file: str, *, sha256: str | None = None) -> AnalysisDefaults:
    """Validate the parsed JSON of an ``ovstore_defaults.json`` strictly: unknown keys, wrong
    types and out-of-range values are refused naming ``file``, the key and the fix."""
    from .label import check_label_defaults

    if not isinstance(data, dict):
        raise InvalidInputError(f"{file} must hold a JSON object like {{\"format\": 1, \"label\": {{...}}, "
                                "\"maps\": {...}}; fix the file or remove it")
    unknown = [k for k in data if k not in _SECTIONS]
    if unknown:
        raise InvalidInputError(f"{file}: unknown key {unknown[0]!r}; the file holds only {', '.join(_SECTIONS)}; "
                                "fix the name or remove the key")
    fmt = data.get("format")
    if fmt != DEFAULTS_FORMAT or isinstance(fmt, bool):
        raise InvalidInputError(f"{file}: \"format\" is {json.dumps(fmt) if 'format' in data else 'missing'}; "
                                f"this ovstore reads format {DEFAULTS_FORMAT}: write \"format\": {DEFAULTS_FORMAT}")
    label = _section(data, "label", file)
    maps = _section(data, "maps", file)
    for key, value in maps.items():
        if key != "normalize":
            raise InvalidInputError(f"{file}: unknown key maps.{key}; maps holds only normalize; fix the name or "
                                    "remove the key")
        if value not in DISPLAY_NORMALIZATIONS or not isinstance(value, str):
            raise InvalidInputError(f"{file}: maps.normalize is {json.dumps(value)}, not one of "
                                    f"{', '.join(DISPLAY_NORMALIZATIONS)}; write one of them or remove the key")
    return AnalysisDefaults(label=check_label_defaults(label, file), maps=dict(maps), file=file, sha256=sha256)


def _section(data: Mapping[str, Any], name: str, file: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise InvalidInputError(f"{file}: {name} is {json.dumps(value)}, not a JSON object; write "
                                f"\"{name}\": {{...}} or remove the key")
    return value


def read_defaults_file(path: str | Path, name: str | None = None) -> AnalysisDefaults:
    """Read and validate one defaults file; ``name`` is how errors and the store name it
    (default: the path)."""
    from .inputs import read_text

    path = Path(path)
    name = name or str(path)
    text = read_text(path, "model defaults file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{name} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                                "fix the file or remove it") from None
    return parse_model_defaults(data, name, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def read_model_defaults(model: str | Path, *, source: str = "local",
                        revision: str | None = None) -> AnalysisDefaults | None:
    """The defaults of a model directory (``source`` ``local`` or ``builtin``: ``model`` is the
    directory) or of a hub id (``source="hub"``); ``None`` when it has none.

    Hub ids go through ``huggingface_hub.hf_hub_download`` with its cache, like the pipeline's
    own files: a repository without the file, or no network and nothing cached, means no
    defaults; a file that is there is validated like a local one.
    """
    if source != "hub":
        path = Path(model).expanduser() / DEFAULTS_FILE
        return read_defaults_file(path.resolve()) if path.is_file() else None
    local = _hub_file(str(model), revision)
    if local is None:
        return None
    return read_defaults_file(local, f"{model}/{DEFAULTS_FILE}" + (f"@{revision}" if revision else ""))


def _hub_file(repo_id: str, revision: str | None) -> str | None:
    """The cached (or downloaded) hub file, or ``None`` where there is none to be had."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return None
    absent: tuple[type[BaseException], ...] = tuple(
        getattr(hub_errors, name) for name in ("EntryNotFoundError", "LocalEntryNotFoundError",
                                               "RepositoryNotFoundError", "RevisionNotFoundError",
                                               "OfflineModeIsEnabled", "HfHubHTTPError")
        if hasattr(hub_errors, name)) + (OSError, ValueError)
    try:
        import httpx

        absent += (httpx.HTTPError,)
    except ImportError:  # older huggingface_hub use requests, whose errors are OSErrors
        pass
    try:
        return hf_hub_download(repo_id, DEFAULTS_FILE, revision=revision)
    except absent:
        return None
