"""ovstore.label.label_config: the class list and settings of `ovstore label`, from Python."""

from __future__ import annotations

import pytest

from ovstore.errors import InvalidInputError
from ovstore.label import LabelConfig, label_config, parse_class_thresholds


def test_classes_then_file_in_order(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("# pets\nsofa\nlamp\n\n")
    config = label_config(classes="cat,dog", classes_file=names, class_thresholds=["cat=0.4"], adaptive=True,
                          sweep="0.3:0.5:0.1", mode="compete", threshold=0.5)
    assert isinstance(config, LabelConfig)
    assert config.classes == ("cat", "dog", "sofa", "lamp")
    assert config.class_thresholds == {"cat": 0.4} and config.mode == "compete" and config.threshold == 0.5
    assert config.adaptive and config.sweep == pytest.approx((0.3, 0.4, 0.5))
    assert label_config(classes=["a", "b"]).classes == ("a", "b")


@pytest.mark.parametrize("options, message", [
    (dict(classes="cat,,dog"), "name 2 is empty"),
    (dict(classes="cat", sweep="0.3,0.5"), "add --adaptive"),
    (dict(classes="cat", class_thresholds=["cat"]), "write CLASS=VALUE"),
])
def test_bad_options(options, message):
    with pytest.raises(InvalidInputError, match=message):
        label_config(**options)


def test_parse_class_thresholds():
    assert parse_class_thresholds({"cat": 1}) == {"cat": 1.0}
    assert parse_class_thresholds([" cat =0.25", "dog=1e-1"]) == {"cat": 0.25, "dog": 0.1}
    assert parse_class_thresholds(None) == {}


def test_evaluation_classes(tmp_path):
    from ovstore.label import evaluation_classes

    assert evaluation_classes("cat,dog") == ["background", "cat", "dog"]
    assert evaluation_classes() is None
    with pytest.raises(InvalidInputError, match="not both"):
        evaluation_classes("cat", tmp_path / "labelmap.txt")
