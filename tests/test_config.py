"""Settings: every one documented in the README, every one a flag (but secrets), all validated."""

from __future__ import annotations

import re
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le
from pydantic import ValidationError

from pipeline.cli import build_parser, settings_from
from pipeline.config import TRADINGVIEW_SENDERS, Settings
from tests.support import repo_root


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (repo_root() / "README.md").read_text()
    documented = set(re.findall(r"`SIGNALBOX_([A-Z_]+)`", readme))
    assert documented >= {name.upper() for name in Settings.model_fields}


def _number(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _range(name: str) -> str:
    """A setting's bounds as the README's table writes them: `1 to 64`, `> 0`, `≥ 1024`."""
    low = high = above = None
    for bound in Settings.model_fields[name].metadata:
        if isinstance(bound, Ge):
            low = _number(bound.ge)
        elif isinstance(bound, Le):
            high = _number(bound.le)
        elif isinstance(bound, Gt):
            above = _number(bound.gt)
    if low is not None and high is not None:
        return f"{low} to {high}"
    if above is not None:
        return f"> {above}"
    return f"≥ {low}" if low is not None else ""


def test_readme_configuration_table_gives_each_default_and_range() -> None:
    readme = (repo_root() / "README.md").read_text()
    rows = re.findall(r"^\|.*\| `SIGNALBOX_([A-Z_]+)` \| (.*?) \| (.*?) ?\|$", readme, re.M)
    assert {name.lower() for name, _, _ in rows} == set(Settings.model_fields)
    for name, default, bounds in rows:
        field = Settings.model_fields[name.lower()]
        assert bounds.strip() == _range(name.lower()), name
        written = default.split(";")[0].strip("`")
        if field.default is None or field.default == []:
            assert not default.startswith("`"), name  # none, any, everyone, no limit
        elif isinstance(field.default, bool):
            assert written == str(field.default).lower(), name
        elif isinstance(field.default, int | float):
            assert written == _number(field.default), name
        else:
            assert written == field.default, name


def test_every_setting_but_the_secrets_is_a_serve_flag() -> None:
    args = build_parser().parse_args([
        "serve", "--heartbeat", "3", "--allowed-sources", "10.0.0.0/8, tradingview",
        "--no-migrate", "--max-lag", "60", "--window", "500",
    ])
    settings = settings_from(args)
    assert settings.heartbeat == 3.0 and settings.migrate is False
    assert settings.max_lag == 60 and settings.window == 500
    assert settings.allowed_sources == ["10.0.0.0/8", *TRADINGVIEW_SENDERS]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--admin-token", "x"])


def test_a_flag_turns_a_switch_either_way_whatever_the_environment_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every on/off setting has a flag for each way, so that a command line can turn off
    what the environment turned on (and the reverse), as flags beat the environment."""
    switches = [name for name, field in Settings.model_fields.items() if field.annotation is bool]
    assert len(switches) >= 4
    for name in switches:
        flag = name.replace("_", "-")
        for env_value, words, expected in (("true", [f"--no-{flag}"], False),
                                           ("false", [f"--{flag}"], True),
                                           ("true", [], True), ("false", [], False)):
            monkeypatch.setenv(f"SIGNALBOX_{name.upper()}", env_value)
            settings = settings_from(build_parser().parse_args(["serve", *words]))
            assert getattr(settings, name) is expected, (name, env_value, words)


def test_bad_values_are_refused_with_the_setting_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="heartbeat"):
        Settings(heartbeat=0)
    with pytest.raises(ValidationError, match="handler_lease"):  # renewals need the time
        Settings(handler_lease=0.5)
    monkeypatch.setenv("SIGNALBOX_TRUSTED_PROXIES", "not-an-address")
    with pytest.raises(ValidationError, match="not an IP address"):
        Settings()


def test_log_level_is_one_of_four_in_any_case() -> None:
    assert Settings(log_level=" WARNING ").log_level == "warning"
    with pytest.raises(ValidationError, match="'debug', 'info', 'warning' or 'error'"):
        Settings(log_level="bogus")
