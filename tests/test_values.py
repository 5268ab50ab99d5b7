"""The shared value types: one Name, one Roi, one TargetFrr, and the config's field types, with the
sentences every surface (YAML config, recipe.json, CLI, command bodies) reports."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from anomalygpt_edge.runtime import values
from anomalygpt_edge.runtime.values import ConfigPath, ExistingPath, Flag, Name, Roi, TargetFrr, Text, TopicLevel


@pytest.mark.parametrize("name", ["bracket", "Bracket-v2", "tile_01.b", "CONsole", "NULL", "x" * 64])
def test_ordinary_part_names_are_names(name: str) -> None:
    assert values.parse(Name, name, "recipe") == name


@pytest.mark.parametrize(
    ("name", "why"),
    [("Bracket:v2", "invalid"), ("a/b", "invalid"), ("nl\n", "invalid"), ("", "invalid"), ("x" * 65, "invalid"),
     (".x", "invalid"), ("CON", "reserved"), ("lpt9.txt", "reserved")],
)  # fmt: skip
def test_a_name_that_cannot_be_a_folder_and_a_topic_level_is_refused_with_the_reason(name: Any, why: str) -> None:
    with pytest.raises(ValueError, match=f"recipe: name .* {why}"):
        values.parse(Name, name, "recipe")


def test_a_roi_is_four_whole_pixel_counts_with_sides_of_at_least_the_minimum() -> None:
    assert values.parse(Roi, [0, 0, 8, 8], "roi") == (0, 0, 8, 8)
    assert values.roi_from_text("10,20,300,200") == (10, 20, 300, 200)
    side = values.MIN_ROI_SIDE
    for bad in (
        [1, 2, 3],
        [0, 0, side - 1, 100],
        [-1, 0, 100, 100],
        [0, 0, 100.5, 100],
        [True, 0, 100, 100],
        "0,0,9,9",
    ):
        with pytest.raises(ValueError, match=r"^roi: must be \[x, y, w, h\]"):
            values.parse(Roi, bad, "roi")
    with pytest.raises(ValueError, match="roi: must be x,y,w,h in whole pixels, got 'a,b'"):
        values.roi_from_text("a,b")


def test_a_target_false_reject_rate_lies_strictly_between_zero_and_one_half() -> None:
    assert values.parse(TargetFrr, 0.01, "target_frr") == 0.01
    for bad in (0, 0.5, -0.1, math.nan, True, "0.01"):
        with pytest.raises(ValueError, match=r"target_frr: must be a number in \(0, 0.5\)"):
            values.parse(TargetFrr, bad, "target_frr")


class _Section(BaseModel):
    port: values.integer(1, 65535) = 1
    rate: values.number(0, 1) = 0.0
    pixels: values.integer(1) = 1
    enabled: Flag = False
    host: Text = "localhost"
    prefix: TopicLevel = "anomalygpt"
    path: ConfigPath = Path("data")
    secret: ExistingPath | None = None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", "lots", "must be an integer between 1 and 65535, got 'lots'"),
        ("port", 1883.0, "must be an integer between 1 and 65535, got 1883.0"),
        ("port", True, "must be an integer between 1 and 65535, got True"),
        ("pixels", 0, "must be an integer >= 1, got 0"),
        ("rate", 2, "must be a number between 0 and 1, got 2"),
        ("rate", math.nan, "must be a number between 0 and 1, got nan"),
        ("enabled", "yes", "must be true or false, got 'yes'"),
        ("host", "", "must be a non-empty string, got ''"),
        ("host", False, "must be a non-empty string, got False"),
        ("prefix", "a/b", "'a/b' cannot be an MQTT topic level"),
        ("secret", "/nonexistent/secret", "/nonexistent/secret does not exist"),
    ],
)
def test_a_config_field_refuses_what_pydantic_would_coerce_with_a_sentence(
    field: str, value: Any, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        _Section.model_validate({field: value})
    assert message in str(info.value.errors()[0]["ctx"]["error"])


def test_config_paths_are_relative_to_the_config_files_folder_and_numbers_read_from_text_stay_text() -> None:
    section = _Section.model_validate({"path": "store", "host": 10}, context={"base": Path("/plant")})
    assert section.path == Path("/plant/store") and section.host == "10"
    assert _Section.model_validate({"path": "/abs/store"}, context={"base": Path("/plant")}).path == Path("/abs/store")
    assert _Section.model_validate({"path": "store"}).path == Path("store")  # no file: as given
    assert values.as_text(5) == "5" and values.as_text(True) is True
