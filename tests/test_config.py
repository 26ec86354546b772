"""Settings: contract names, precedence (env > .env > hermes.yaml > defaults), one clear line per error."""

from __future__ import annotations

import builtins
import errno
import io
from pathlib import Path
from typing import Any

import pytest

from bot.cli import main
from bot.config import SettingsError, load_settings, without_password

CONTRACT = {
    "DISCORD_TOKEN", "HERMES_DATABASE_URL", "HERMES_QUEUE_URL", "HERMES_ENGINE", "HERMES_MODEL",
    "HERMES_OPENAI_BASE_URL", "HERMES_OPENAI_API_KEY", "HERMES_PERSONAS_DIR", "HERMES_DEFAULT_PERSONA",
    "HERMES_DISCORD_API_BASE", "HERMES_DISCORD_GATEWAY_URL",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("HERMES_") or name == "DISCORD_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_the_contract() -> None:
    s = load_settings()
    assert s.database_url == "sqlite+aiosqlite:///data/hermes.db"
    assert s.queue_url == "memory://"
    assert s.engine == "transformers"
    assert s.model == "teknium/OpenHermes-2.5-Mistral-7B"
    assert str(s.personas_dir) == "personas"
    assert s.default_persona == "hermes"
    assert s.discord_token is None and s.discord_api_base is None


def test_every_contract_name_is_a_setting() -> None:
    from bot.config import Settings

    names = {f.validation_alias.choices[0] for f in Settings.model_fields.values()}  # type: ignore[union-attr]
    assert CONTRACT <= names


def test_precedence_env_over_dotenv_over_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "hermes.yaml").write_text("HERMES_MODEL: from-yaml\nHERMES_DEFAULT_PERSONA: edward_elric\n")
    assert load_settings().model == "from-yaml"
    (tmp_path / ".env").write_text("HERMES_MODEL=from-dotenv\n")
    s = load_settings()
    assert s.model == "from-dotenv" and s.default_persona == "edward_elric"
    monkeypatch.setenv("HERMES_MODEL", "from-env")
    assert load_settings().model == "from-env"


def test_each_invalid_setting_gets_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMES_ENGINE", "vllm")
    monkeypatch.setenv("HERMES_QUEUE_URL", "amqp://x")
    monkeypatch.setenv("HERMES_DATABASE_URL", "postgresql://sync/driver")
    with pytest.raises(SettingsError) as info:
        load_settings()
    lines = info.value.lines
    assert len(lines) == 3
    assert any(line.startswith("invalid setting HERMES_ENGINE:") and "'vllm'" in line for line in lines)
    assert any("HERMES_QUEUE_URL" in line and "redis://" in line for line in lines)
    assert any("HERMES_DATABASE_URL" in line and "not supported; use sqlite+aiosqlite" in line for line in lines)


def test_shard_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (load_settings().shard_count, load_settings().shard_ids) == (None, None)  # Discord recommends
    monkeypatch.setenv("HERMES_SHARD_COUNT", "4")
    monkeypatch.setenv("HERMES_SHARD_IDS", "0, 2")
    assert (load_settings().shard_count, load_settings().shard_ids) == (4, [0, 2])
    monkeypatch.setenv("HERMES_SHARD_IDS", "1,4")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.lines == ["invalid settings: HERMES_SHARD_IDS [4] outside 0..3 (HERMES_SHARD_COUNT)"]
    monkeypatch.delenv("HERMES_SHARD_COUNT")
    with pytest.raises(SettingsError, match="HERMES_SHARD_IDS needs HERMES_SHARD_COUNT"):
        load_settings()


def test_secret_values_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "hermes.yaml").write_text("DISCORD_TOKEN: [sekrit-token-value]\n")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "DISCORD_TOKEN" in str(info.value)
    assert "sekrit-token-value" not in str(info.value)


def test_a_platforms_own_variables_are_not_read_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosting platforms set DATABASE_URL, LOG_LEVEL and the like for their own use: only HERMES_* names count."""
    for name, value in {"DATABASE_URL": "postgres://platform/db", "LOG_LEVEL": "warn", "MODEL": "gpt-4o",
                        "database_url": "postgres://x", "engine": "openai"}.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.database_url == "sqlite+aiosqlite:///data/hermes.db" and s.model == "teknium/OpenHermes-2.5-Mistral-7B"
    assert s.engine == "transformers" and s.log_level == "INFO"
    assert load_settings(model="from-code").model == "from-code"  # code may still pass field names


def test_a_misspelt_setting_in_hermes_yaml_is_named(tmp_path: Path) -> None:
    (tmp_path / "hermes.yaml").write_text("HERMES_MODLE: foo\nHERMES_DEFAULT_PERSONA: hermes\nshiny: 1\n")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert raised.value.lines == [
        "hermes.yaml: unknown setting HERMES_MODLE (did you mean HERMES_MODEL?)",
        "hermes.yaml: unknown setting shiny (README.md, Configuration, lists them all)",
    ]


def test_a_rejected_url_is_shown_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMES_DATABASE_URL", "postgresql://hermes:s3c/r@tpw@db:5432/hermes")
    monkeypatch.setenv("HERMES_QUEUE_URL", "amqp://guest:hunter2@mq:5672/")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert [line.rsplit(" (got ", 1)[1] for line in raised.value.lines] == [
        "'postgresql://hermes:***@db:5432/hermes')", "'amqp://guest:***@mq:5672/')",
    ]


def test_a_config_file_named_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERMES_CONFIG_FILE", str(tmp_path / "hermes.yml"))
    with pytest.raises(SettingsError, match=f"HERMES_CONFIG_FILE: no such file: {tmp_path / 'hermes.yml'}"):
        load_settings()


def test_bad_yaml_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "hermes.yaml").write_text("HERMES_MODEL: [unclosed\n")
    with pytest.raises(SettingsError, match="hermes.yaml:1: not valid YAML"):
        load_settings()


def test_a_setting_given_twice_in_hermes_yaml_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "hermes.yaml").write_text("HERMES_MODEL: a\nHERMES_ENGINE: openai\nHERMES_MODEL: b\n")
    with pytest.raises(SettingsError, match=r"hermes.yaml:3: not valid YAML: duplicate key 'HERMES_MODEL' \(first on line 1\)$"):
        load_settings()


def test_cli_prints_settings_errors_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HERMES_CONTEXT_TOKENS", "lots")
    assert main(["personas", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hermes-bot: invalid setting HERMES_CONTEXT_TOKENS:") and "Traceback" not in err


def test_run_without_token_explains_and_points_to_chat(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "DISCORD_TOKEN is not set" in err and "hermes-bot chat" in err


NO_HTTP_URL = "must be an http:// or https:// URL with a host"


@pytest.mark.parametrize(("name", "url", "problem"), [
    ("HERMES_DATABASE_URL", "sqlite+aiosqlite://data/hermes.db", "a SQLite URL names a file after three slashes"),
    ("HERMES_DATABASE_URL", "sqlite+aiosqlite:///:memory:", "names no file"),
    ("HERMES_DATABASE_URL", "sqlite+aiosqlite:///", "names no file"),
    ("HERMES_DATABASE_URL", "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true", "names no file"),
    ("HERMES_DATABASE_URL", "postgresql+asyncpg://hermes:pw@db:notaport/hermes", "the port after host: must be a number"),
    ("HERMES_DATABASE_URL", "postgresql+asyncpg://hermes:pw@db:99999/hermes", "port 99999 is not a TCP port (1-65535)"),
    # `localhost:1234` was accepted, then every request failed: "cannot reach ... at localhost:1234/chat/completions".
    ("HERMES_OPENAI_BASE_URL", "localhost:1234", NO_HTTP_URL),
    ("HERMES_OPENAI_BASE_URL", "localhost:1234/v1", NO_HTTP_URL),
    ("HERMES_OPENAI_BASE_URL", "ftp://host/v1", NO_HTTP_URL),
    ("HERMES_OPENAI_BASE_URL", "http:///v1", NO_HTTP_URL),
    # redis-py raised a ValueError traceback at the first command for these, and read `/abc` as database 0.
    ("HERMES_QUEUE_URL", "redis://127.0.0.1:99999/0", "the port after host: must be a TCP port (1-65535)"),
    ("HERMES_QUEUE_URL", "redis://:s3cret@127.0.0.1:notaport/0", "the port after host: must be a TCP port (1-65535)"),
    ("HERMES_QUEUE_URL", "redis://127.0.0.1:6379/abc", "the database after the last / must be a number"),
    ("HERMES_DISCORD_API_BASE", "localhost:8080", NO_HTTP_URL),
    ("HERMES_DISCORD_GATEWAY_URL", "localhost:8080/gateway", "must be a ws:// or wss:// URL with a host"),
    # torch's RuntimeError traceback at the model's load, after logging in to Discord under `run`.
    ("HERMES_DEVICE", "gpu", "must be auto, cpu, cuda, cuda:N"),
    ("HERMES_DEVICE", "cuda:one", "must be auto, cpu, cuda, cuda:N"),
    # `inf` was an OverflowError traceback where a deadline is computed (Redis), or a stop that never ends.
    ("HERMES_JOB_TIMEOUT_S", "inf", "Input should be a finite number"),
    ("HERMES_SHUTDOWN_GRACE_S", "inf", "Input should be a finite number"),
    ("HERMES_SHUTDOWN_GRACE_S", "nan", "Input should be a finite number"),
])
def test_a_value_no_client_can_use_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, name: str, url: str, problem: str
) -> None:
    monkeypatch.setenv(name, url)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    [line] = raised.value.lines
    assert line.startswith(f"invalid setting {name}: {problem}"), line
    assert line.endswith(f"(got {without_password(url)!r})"), line


@pytest.mark.parametrize("name", ["hermes.yaml", ".env"])
def test_a_settings_file_that_is_not_utf8_is_named_with_the_offset(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"HERMES_MODEL: a\n# caf\xe9\n")  # Latin-1, from an editor
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert raised.value.lines == [f"{name}:2: not UTF-8 text (byte 0xe9 at offset 21); save it as UTF-8"]


@pytest.mark.parametrize("name", ["hermes.yaml", ".env"])
def test_a_settings_file_that_cannot_be_read_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    (tmp_path / name).write_text("HERMES_MODEL: a\n")
    real_open = io.open

    def denied(file: Any, *args: Any, **kwargs: Any) -> Any:  # the tests run as root, which reads any file
        if Path(file).name == name:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", denied)
    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert raised.value.lines == [f"{name}: cannot read: Permission denied"]


def test_url_passwords_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log filter redacts what secrets() lists wherever it appears: a password whole (even with "/" or "@"
    in it), also decoded. A short one ("r3dis", compose's "hermes") would blank ordinary words and numbers
    everywhere: it is masked inside URLs only (test_logging)."""
    monkeypatch.setenv("HERMES_OPENAI_BASE_URL", "http://proxy-user@proxy:8080/v1")
    monkeypatch.setenv("HERMES_DATABASE_URL", "postgresql+asyncpg://hermes:s3c/r@t%40pw@db:5432/hermes")
    monkeypatch.setenv("HERMES_QUEUE_URL", "redis://:r3dis@redis:6379/0")
    assert sorted(load_settings(discord_token="tok").secrets()) == ["s3c/r@t%40pw", "s3c/r@t@pw", "tok"]
    default = "postgresql+asyncpg://hermes:hermes@postgres:5432/hermes"
    assert load_settings(database_url=default, queue_url="memory://").secrets() == []


def test_home_is_expanded_in_path_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The shell expands `~` in an export, but .env and hermes.yaml pass it on: a folder named `~` was looked for."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "conf.yaml").write_text("HERMES_DEFAULT_PERSONA: edward_elric\n")
    (tmp_path / ".env").write_text("HERMES_PERSONAS_DIR=~/p\nHERMES_CONFIG_FILE=~/conf.yaml\n")
    s = load_settings()
    assert s.personas_dir == tmp_path / "p" and s.default_persona == "edward_elric"


def test_an_unknown_name_in_dotenv_is_named_as_in_hermes_yaml(tmp_path: Path) -> None:
    """A misspelt HERMES_* name in .env ran on the defaults without a word; compose's own names stay allowed."""
    (tmp_path / ".env").write_text(
        "POSTGRES_PASSWORD=pw\nTORCH_CUDA=cu128\nhermes_model=lowercase-works\nHERMES_DEFAULT_PERSONNA=edward_elric\n"
        "export HERMES_MODLE=x\n"
    )
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert raised.value.lines == [
        ".env: unknown setting HERMES_DEFAULT_PERSONNA (did you mean HERMES_DEFAULT_PERSONA?)",
        ".env: unknown setting HERMES_MODLE (did you mean HERMES_MODEL?)",
    ]
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=pw\nTORCH_CUDA=cu128\nhermes_model=lowercase-works\n")
    assert load_settings().model == "lowercase-works"


def test_an_empty_line_from_env_example_may_be_filled_in_further_down(tmp_path: Path) -> None:
    """`cp .env.example .env` then appending the token: the template's `DISCORD_TOKEN=` is no first value."""
    (tmp_path / ".env").write_text("DISCORD_TOKEN=\nHERMES_LOG_LEVEL=INFO\nDISCORD_TOKEN=abc.def\n")
    token = load_settings().discord_token
    assert token is not None and token.get_secret_value() == "abc.def"


def test_a_setting_given_twice_in_dotenv_is_an_error(tmp_path: Path) -> None:
    """python-dotenv keeps the last silently; hermes.yaml refuses a key given twice, and so does .env now."""
    (tmp_path / ".env").write_text("HERMES_MODEL=a\nPOSTGRES_PASSWORD=x\nPOSTGRES_PASSWORD=y\n\n# note\n\nHERMES_MODEL=b\n")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert raised.value.lines == [".env:7: duplicate setting HERMES_MODEL (first on line 1)"]


def test_hermes_config_file_may_be_set_in_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """.env is where people put what they would export; the yaml source read only the environment."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "bot.yaml").write_text("HERMES_MODEL: from-named-yaml\n")
    (tmp_path / "hermes.yaml").write_text("HERMES_MODEL: from-default-yaml\n")
    (tmp_path / ".env").write_text("HERMES_CONFIG_FILE=conf/bot.yaml\n")
    assert load_settings().model == "from-named-yaml"
    monkeypatch.setenv("HERMES_CONFIG_FILE", "hermes.yaml")  # the environment still comes first
    assert load_settings().model == "from-default-yaml"
    monkeypatch.delenv("HERMES_CONFIG_FILE")
    (tmp_path / ".env").write_text("HERMES_CONFIG_FILE=conf/missing.yaml\n")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert raised.value.lines == ["HERMES_CONFIG_FILE: no such file: conf/missing.yaml"]


def test_an_empty_value_means_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`# HERMES_SHARD_COUNT=` in .env.example, uncommented, was "not a valid integer"; empty text was unset."""
    (tmp_path / ".env").write_text("HERMES_SHARD_COUNT=\nHERMES_CONTEXT_TOKENS=\nHERMES_OPENAI_BASE_URL=\nDISCORD_TOKEN=\"\"\n")
    (tmp_path / "hermes.yaml").write_text("HERMES_HISTORY_TURNS:\nHERMES_LOG_LEVEL: ''\n")
    monkeypatch.setenv("HERMES_MAX_BATCH_SIZE", "")
    s = load_settings()
    assert (s.shard_count, s.context_tokens, s.openai_base_url, s.discord_token) == (None, 8192, None, None)
    assert (s.history_turns, s.log_level, s.max_batch_size) == (50, "INFO", 32)
    monkeypatch.setenv("DISCORD_TOKEN", "")
    assert main(["run"]) == 2
    assert "DISCORD_TOKEN is not set" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "value"), [
    ("HERMES_DEVICE", "cuda:1"), ("HERMES_DEVICE", "mps"), ("HERMES_QUEUE_URL", "redis://localhost"),
    ("HERMES_QUEUE_URL", "rediss://:pw@redis.example.com:6380/15"), ("HERMES_QUEUE_URL", "unix:///run/redis.sock?db=2"),
    ("HERMES_DISCORD_GATEWAY_URL", "ws://127.0.0.1:8080/gateway"),
])
def test_the_forms_those_settings_take_are_accepted(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    assert value in load_settings().model_dump().values()


@pytest.mark.parametrize("url", ["http://localhost:1234/v1", "https://api.example.com/v1", "http://u:p@[::1]:8080"])
def test_an_http_openai_base_url_is_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("HERMES_OPENAI_BASE_URL", url)
    assert load_settings().openai_base_url == url
