"""config/personalization.toml: the shipped example loads; mistakes stop start-up naming table and key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from stream_app.configure import personalization_config
from stream_app.errors import ConfigError
from stream_app.paths import CONFIG_DIR
from stream_app.personalization.config import parse_config
from stream_app.settings import Settings
from stream_app.tomlmodels import TomlError

SEGMENTS = frozenset({"power_user", "struggling", "passive"})


def shipped() -> dict[str, Any]:
    return tomllib.loads((CONFIG_DIR / "personalization.toml").read_text())


def test_the_shipped_file_has_the_articles_three_checklists_and_a_default() -> None:
    config = personalization_config(Settings())
    assert [c.name for c in config.checklists] == ["struggling", "power", "passive"]
    assert config.default.items and config.recommendations.count == 3


@pytest.mark.parametrize(
    ("change", "where", "words"),
    [
        (lambda raw: raw["checklists"][0].update(segments=["no_such"]), "checklists[0]", "no such segment"),
        (lambda raw: raw["checklists"][1].update(clusters=["wizards"]), "checklists[1]", "neither a cluster"),
        (lambda raw: raw["checklists"][0].update(colour="red"), "checklists[0]", "unknown keys ['colour']"),
        (lambda raw: raw["checklists"][2].update(name="power"), "checklists[2]", "used twice"),
        (lambda raw: raw.pop("default"), "(top)", "needs `default`"),
        (lambda raw: raw["flags"]["live_chat"].update(segments=[], clusters=[]), "flags.live_chat", "needs"),
        (lambda raw: raw["recommendations"].update(count=50), "recommendations", "`count` must be between"),
        (lambda raw: raw["checklists"][0].update(items=[]), "checklists[0]", "items"),
    ],
)
def test_mistakes_name_the_table_and_the_key(change: Any, where: str, words: str) -> None:
    raw = shipped()
    change(raw)
    with pytest.raises(TomlError) as err:
        parse_config(raw, SEGMENTS | {"active_engaged"})
    assert err.value.where == where and words in err.value.problem, str(err.value)


def test_a_bad_file_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text('[default]\nname = "x"\nitems = []\n')
    with pytest.raises(ConfigError) as err:
        personalization_config(Settings(personalization_file=bad))
    assert err.value.setting == "PERSONALIZATION_FILE" and "default" in str(err.value)


def test_cluster_ids_are_accepted_as_well_as_names() -> None:
    raw = shipped()
    raw["checklists"][0]["clusters"] = ["c3", "struggling"]
    assert parse_config(raw, SEGMENTS | {"active_engaged"}).checklists[0].clusters == ["c3", "struggling"]
