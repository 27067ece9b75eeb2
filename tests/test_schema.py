"""The shared schema helpers: dotted paths through mixed data, and keys a section has removed."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import ValidationError

from hybridkit.schema import MISSING, StrictModel, get_path, set_path, split_path


class Inner(StrictModel):
    items: list[int] = [1, 2, 3]


class Outer(StrictModel):
    inner: Inner = Inner()
    removed_keys: ClassVar[dict[str, str]] = {"old": "renamed to 'new'"}
    new: int = 0


def test_split_path_gives_a_pydantic_loc():
    assert split_path("curriculum.0.min_len") == ("curriculum", 0, "min_len")
    assert split_path("") == ()


def test_get_path_walks_models_mappings_and_lists():
    data = {"a": [{"b": 1}], 5: "five", "m": Outer()}
    assert get_path(data, ["a", 0, "b"]) == 1
    assert get_path(data, ["a", "0", "b"]) == 1  # an index written as text
    assert get_path(data, ["5"]) == "five"  # an int key written as text
    assert get_path(data, ["m", "inner", "items", -1]) == 3
    assert get_path(data, ["a", 3]) is None
    assert get_path(data, ["nope", "x"], default=MISSING) is MISSING


def test_set_path_creates_or_reports():
    data: dict = {"model": {"overrides": {5: {"mixer.window": 8}}}, "list": [0, 1]}
    assert set_path(data, ["train", "lr"], 0.1, create=True) is None
    assert data["train"] == {"lr": 0.1}
    # the longest existing dotted key wins, and integer keys match their text
    assert set_path(data, ["model", "overrides", "5", "mixer", "window"], 4, create=True) is None
    assert data["model"]["overrides"][5] == {"mixer.window": 4}
    assert set_path(data, ["list", "-1"], 7, create=True) is None and data["list"] == [0, 7]
    assert "out of range" in set_path(data, ["list", "2"], 0, create=True)
    assert "not an integer index" in set_path(data, ["list", "x"], 0, create=True)
    assert "not a mapping" in set_path(data, ["train", "lr", "x"], 0, create=True)
    assert set_path(data, ["eval", "x"], 0, create=False) == "unknown key 'eval'"
    assert "eval" not in data
    assert set_path(data, ["train", "new_leaf"], 1, create=False) is None  # left to validation


def test_removed_keys_get_their_own_message_at_the_key():
    with pytest.raises(ValidationError) as err:
        Outer.model_validate({"old": 1})
    (e,) = err.value.errors()
    assert e["loc"] == ("old",) and e["msg"] == "renamed to 'new'" and e["type"] == "removed_key"
    with pytest.raises(ValidationError, match="Extra inputs"):
        Outer.model_validate({"typo": 1})
