"""The deployment files say what the code accepts: every systemd unit's command line parses with the
real CLI, and every setting its environment sets is a setting the configuration loader knows."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tilestream.config import load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def unit_lines(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith(key + "=")]


def env_of(path: Path) -> dict[str, str]:
    env = {}
    for line in (DEPLOY / "config" / "tilestream.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k] = v
    for assignment in unit_lines(path, "Environment"):
        k, v = assignment.split("=", 1)
        env[k] = v
    return env


def test_there_is_a_unit_for_every_role():
    assert {u.stem for u in UNITS} == {f"tilestream-{r}" for r in ("agent", "processor", "classifier", "dashboard")}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.stem)
def test_each_unit_command_parses_and_its_settings_load(unit):
    [exec_start] = unit_lines(unit, "ExecStart")
    argv = shlex.split(exec_start)
    if argv[0].endswith("/tilestream"):
        from tilestream_cli import build_parser

        build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown flag
    else:
        assert argv[1:3] == ["-m", "dashboard"], argv
        from dashboard.__main__ import build_parser as dashboard_parser

        dashboard_parser().parse_args(argv[3:])
    env = env_of(unit)
    config = env.pop("TILESTREAM_CONFIG", None)
    settings = load_settings(env=env) if config is None else load_settings(
        DEPLOY / "config" / Path(config).name, env=env)
    assert settings.kafka.security_protocol == "SASL_SSL" and settings.kafka.replication_factor == 3
    if "TILESTREAM_KAFKA_SASL_USERNAME" in env:
        assert settings.kafka.sasl_username == env["TILESTREAM_KAFKA_SASL_USERNAME"]
        assert settings.kafka.sasl_password_file.startswith("/etc/tilestream/secrets/")
