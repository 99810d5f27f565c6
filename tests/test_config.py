"""Settings declared once: each field of the server's and the client's config carries its flag and environment
variable, and the parsers are made from them."""

from __future__ import annotations

import dataclasses

import pytest

from server.config import ServerConfig, build_parser, parse_config
from splitcore.settings import DEFAULT_SPLIT


def test_defaults_are_the_dataclass_defaults(monkeypatch):
    for f in dataclasses.fields(ServerConfig):
        envs = f.metadata.get("env") or ()
        for name in (envs,) if isinstance(envs, str) else envs:
            monkeypatch.delenv(name, raising=False)
    assert parse_config([]) == ServerConfig()
    assert ServerConfig().split == DEFAULT_SPLIT


def test_environment_then_flags(monkeypatch):
    monkeypatch.setenv("GPT2_MAX_SESSIONS", "7")
    monkeypatch.setenv("GPT2_BATCH_WAIT_MS", "2.5")
    monkeypatch.setenv("GPT2_FALLBACK_RANDOM", "1")
    monkeypatch.setenv("GPT2_AUTH_TOKEN", "")  # empty: none
    monkeypatch.setenv("GPT2_DTYPE", "float16")
    monkeypatch.setenv("GPT2_SERVER_DTYPE", "bfloat16")  # the server's own name wins
    cfg = parse_config([])
    assert (cfg.max_sessions, cfg.batch_wait_ms, cfg.fallback_random, cfg.auth_token, cfg.dtype) == (
        7,
        2.5,
        True,
        None,
        "bfloat16",
    )
    cfg = parse_config(["--max-sessions", "9", "--idle-timeout", "3", "--grace", "1.5", "-v"])
    assert (cfg.max_sessions, cfg.idle_timeout_s, cfg.grace_s, cfg.verbose) == (9, 3.0, 1.5, True)


def test_bad_environment_value_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("GPT2_KV_SLOTS", "many")
    with pytest.raises(SystemExit) as e:
        build_parser()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("error: GPT2_KV_SLOTS='many' is not an integer")


def test_a_setting_from_a_mounted_file(monkeypatch, tmp_path, capsys):
    """NAME_FILE gives NAME's value from a file (a container's mounted secret), its final newline dropped; NAME
    itself wins; a missing file is one line."""
    monkeypatch.delenv("GPT2_AUTH_TOKEN", raising=False)
    (tmp_path / "token").write_text("s3cret\n")
    monkeypatch.setenv("GPT2_AUTH_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("GPT2_MAX_SESSIONS_FILE", str(tmp_path / "token"))  # read only where NAME is unset
    monkeypatch.setenv("GPT2_MAX_SESSIONS", "5")
    assert (parse_config([]).auth_token, parse_config([]).max_sessions) == ("s3cret", 5)
    monkeypatch.setenv("GPT2_AUTH_TOKEN", "plain")
    assert parse_config([]).auth_token == "plain"
    monkeypatch.delenv("GPT2_AUTH_TOKEN")
    monkeypatch.setenv("GPT2_AUTH_TOKEN_FILE", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as e:
        build_parser()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "GPT2_AUTH_TOKEN_FILE: cannot read" in err and "No such file" in err


def test_every_field_has_a_flag_with_help():
    actions = {a.dest: a for a in build_parser()._actions}
    for f in dataclasses.fields(ServerConfig):
        assert f.name in actions, f.name
        assert actions[f.name].help and len(actions[f.name].help) > 10, f.name
    with pytest.raises(SystemExit):
        parse_config(["--event-loop", "trio"])


def test_client_and_baseline_flags_come_from_their_configs(monkeypatch):
    from baseline.cli import build_parser as baseline_parser
    from client.cli import build_parser as client_parser
    from client.cli import client_config
    from client.config import ClientConfig
    from splitcore.settings import GenerateConfig

    monkeypatch.setenv("GPT2_TRUNK_SERVER", "trunk.example:50051")
    monkeypatch.setenv("GPT2_RECONNECT_S", "7")
    args = client_parser().parse_args(["generate", "hi", "--wire-dtype", "float16", "--step-timeout", "9"])
    cfg = client_config(args)
    assert (cfg.server, cfg.reconnect_s, cfg.wire_dtype, cfg.step_timeout_s) == (
        "trunk.example:50051",
        7.0,
        "float16",
        9.0,
    )
    assert cfg.split == DEFAULT_SPLIT
    sub = {a.dest: a for a in client_parser()._actions if a.dest == "command"}["command"].choices
    for command in ("generate", "serve", "api", "train"):
        dests = {a.dest for a in sub[command]._actions}
        assert {f.name for f in dataclasses.fields(ClientConfig)} <= dests, command
    generate = next(a for a in baseline_parser()._actions if a.dest == "command").choices["generate"]
    assert {f.name for f in dataclasses.fields(GenerateConfig)} <= {a.dest for a in generate._actions}


def test_switch_interval_is_set_for_the_process_and_checked():
    import sys

    from server.app import configure_switch_interval
    from splitcore.errors import InvalidInput

    before = sys.getswitchinterval()
    try:
        assert parse_config([]).switch_interval_ms == 0.1
        configure_switch_interval(0)  # 0: Python's own, left as it is
        assert sys.getswitchinterval() == before
        configure_switch_interval(0.25)
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        with pytest.raises(InvalidInput, match="--switch-interval-ms must be >= 0, got -1"):
            configure_switch_interval(-1)
    finally:
        sys.setswitchinterval(before)
