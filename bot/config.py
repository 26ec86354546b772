"""Settings, read once at start from the environment, `.env` and an optional `hermes.yaml`.

Precedence (highest first): environment, `.env`, `hermes.yaml`, defaults. Every name is the one in
the DESIGN.md contract, so `HERMES_MODEL` in the environment and `HERMES_MODEL:` in hermes.yaml mean
the same. Invalid values fail at start with one clear line per problem (`SettingsError`).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from dotenv.parser import Binding, parse_stream
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import make_url

from bot import strict_yaml

DEFAULT_PERSONAS_DIR = Path("personas")  # relative to where the bot runs; see personas.personas_directory

YAML_FILE_ENV = "HERMES_CONFIG_FILE"
DEFAULT_YAML_FILE = "hermes.yaml"


# The URL settings' schemes, and how their errors say them, with an example.
_URL_FORMS = {
    "openai_base_url": (("http", "https"), "an http:// or https:// URL with a host, such as http://localhost:1234/v1"),
    "discord_api_base": (("http", "https"), "an http:// or https:// URL with a host, such as https://discord.com/api/v10"),
    "discord_gateway_url": (("ws", "wss"), "a ws:// or wss:// URL with a host, such as wss://gateway.discord.gg"),
}


class SettingsError(ValueError):
    """Raised with one human-readable line per invalid setting."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _alias(name: str) -> AliasChoices:
    """The public setting name (env, .env, hermes.yaml); code may also pass the field's own name
    (`Settings(model=...)`, populate_by_name), but the environment may not (`_PublicNamesOnly`)."""
    return AliasChoices(name)


class Settings(BaseSettings):
    """All runtime configuration. Field aliases are the public setting names."""

    # env_ignore_empty: `HERMES_SHARD_COUNT=` (an .env.example line uncommented) counts as not set there (the next
    # source or the default applies) rather than "not a valid integer"; `DISCORD_TOKEN=` stays "not set".
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    discord_token: SecretStr | None = Field(None, validation_alias=_alias("DISCORD_TOKEN"))
    database_url: str = Field(
        "sqlite+aiosqlite:///data/hermes.db",
        validation_alias=_alias("HERMES_DATABASE_URL"),
    )
    queue_url: str = Field("memory://", validation_alias=_alias("HERMES_QUEUE_URL"))
    engine: Literal["transformers", "openai"] = Field(
        "transformers", validation_alias=_alias("HERMES_ENGINE")
    )
    model: str = Field(
        "teknium/OpenHermes-2.5-Mistral-7B", validation_alias=_alias("HERMES_MODEL")
    )
    openai_base_url: str | None = Field(
        None, validation_alias=_alias("HERMES_OPENAI_BASE_URL")
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=_alias("HERMES_OPENAI_API_KEY")
    )
    personas_dir: Path = Field(DEFAULT_PERSONAS_DIR, validation_alias=_alias("HERMES_PERSONAS_DIR"))
    default_persona: str = Field("hermes", validation_alias=_alias("HERMES_DEFAULT_PERSONA"))
    discord_api_base: str | None = Field(
        None, validation_alias=_alias("HERMES_DISCORD_API_BASE")
    )
    discord_gateway_url: str | None = Field(
        None, validation_alias=_alias("HERMES_DISCORD_GATEWAY_URL")
    )

    # Model / engine tuning.
    device: str = Field("auto", validation_alias=_alias("HERMES_DEVICE"))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", validation_alias=_alias("HERMES_DTYPE")
    )
    quantization: Literal["none", "bnb-4bit", "bnb-8bit"] = Field(
        "none", validation_alias=_alias("HERMES_QUANTIZATION")
    )
    context_tokens: int = Field(8192, ge=256, validation_alias=_alias("HERMES_CONTEXT_TOKENS"))
    cpu_threads: int = Field(0, ge=0, validation_alias=_alias("HERMES_CPU_THREADS"))
    max_batch_size: int = Field(32, ge=1, validation_alias=_alias("HERMES_MAX_BATCH_SIZE"))
    prefix_cache_mb: int = Field(
        2048, ge=0, validation_alias=_alias("HERMES_PREFIX_CACHE_MB")
    )

    # Queue behaviour.
    queue_max_waiting: int = Field(256, ge=1, validation_alias=_alias("HERMES_QUEUE_MAX_WAITING"))
    queue_max_per_conversation: int = Field(
        2, ge=1, validation_alias=_alias("HERMES_QUEUE_MAX_PER_CONVERSATION")
    )
    queue_max_per_user: int = Field(3, ge=1, validation_alias=_alias("HERMES_QUEUE_MAX_PER_USER"))
    queue_supersede: bool = Field(
        False, validation_alias=_alias("HERMES_QUEUE_SUPERSEDE")
    )
    # allow_inf_nan=False: `inf` overflowed where a deadline or a wait is computed from these.
    job_timeout_s: float = Field(180.0, gt=0, allow_inf_nan=False, validation_alias=_alias("HERMES_JOB_TIMEOUT_S"))
    queue_claim_idle_ms: int = Field(
        30000, ge=50, validation_alias=_alias("HERMES_QUEUE_CLAIM_IDLE_MS")
    )
    queue_max_deliveries: int = Field(
        3, ge=1, validation_alias=_alias("HERMES_QUEUE_MAX_DELIVERIES")
    )

    # Conversation behaviour.
    history_turns: int = Field(50, ge=1, validation_alias=_alias("HERMES_HISTORY_TURNS"))
    admin_role: str | None = Field(None, validation_alias=_alias("HERMES_ADMIN_ROLE"))
    persona_hand_offs: int = Field(1, ge=0, le=10, validation_alias=_alias("HERMES_PERSONA_HAND_OFFS"))
    # Sharding: None lets Discord recommend the count, and one process runs every shard.
    shard_count: int | None = Field(None, ge=1, validation_alias=_alias("HERMES_SHARD_COUNT"))
    shard_ids: Annotated[list[int] | None, NoDecode] = Field(None, validation_alias=_alias("HERMES_SHARD_IDS"))

    # Operations.
    metrics_port: int | None = Field(
        None, ge=0, le=65535, validation_alias=_alias("HERMES_METRICS_PORT")
    )
    shutdown_grace_s: float = Field(
        20.0, ge=0, allow_inf_nan=False, validation_alias=_alias("HERMES_SHUTDOWN_GRACE_S")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias=_alias("HERMES_LOG_LEVEL")
    )

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: str) -> str:
        """Checked here, so every command rejects a URL the drivers cannot use with the same line, not with
        a traceback from the first connection."""
        if "://" not in value:
            raise ValueError("must be a SQLAlchemy URL such as sqlite+aiosqlite:///data/hermes.db")
        scheme = value.split("://", 1)[0]
        if scheme not in {"sqlite+aiosqlite", "postgresql+asyncpg"}:
            raise ValueError(  # the store's dialect code (upserts, migrations) knows these two
                f"driver {scheme!r} is not supported; use sqlite+aiosqlite:// or postgresql+asyncpg://"
            )
        try:
            url = make_url(value)
        except ValueError:  # SQLAlchemy's int() of the port
            raise ValueError(
                "the port after host: must be a number, as in postgresql+asyncpg://user:pw@host:5432/db"
            ) from None
        if url.port is not None and not 1 <= url.port <= 65535:
            raise ValueError(f"port {url.port} is not a TCP port (1-65535)")
        if url.get_backend_name() != "sqlite":
            return value
        if url.host or url.port or url.username or url.password:
            raise ValueError(
                "a SQLite URL names a file after three slashes: sqlite+aiosqlite:///data/hermes.db (relative to "
                "the working directory) or sqlite+aiosqlite:////var/lib/hermes/hermes.db (absolute)"
            )
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file::memory:") or url.query.get("mode") == "memory":
            raise ValueError(
                "names no file, so SQLite would keep an in-memory database: empty for every connection, lost on "
                "exit, never shared by the bot and a worker; name a file, such as sqlite+aiosqlite:///data/hermes.db"
            )
        return value

    @field_validator("queue_url")
    @classmethod
    def _known_queue(cls, value: str) -> str:
        """Checked here like HERMES_DATABASE_URL: redis-py raised a ValueError traceback at the first command for a
        port it cannot use, and read a database that is no number (`/abc`) as database 0 without a word."""
        if value == "memory://" or value.startswith("unix://"):  # a socket's path, its database as ?db=N
            return value
        if not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be memory:// or a redis:// URL such as redis://localhost:6379/0")
        parts = urlsplit(value)
        try:
            usable_port = parts.port != 0 and not parts.netloc.endswith(":")
        except ValueError:  # not a number, or past 65535
            usable_port = False
        if not usable_port:
            raise ValueError("the port after host: must be a TCP port (1-65535), as in redis://localhost:6379/0")
        if not re.fullmatch(r"/?|/\d+", parts.path):
            raise ValueError("the database after the last / must be a number, as in redis://localhost:6379/0")
        return value

    @field_validator("openai_base_url", "discord_api_base", "discord_gateway_url")
    @classmethod
    def _url_with_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Checked here: `localhost:1234` (no scheme) was accepted and every request then failed to connect.
        A port the client cannot use is left to the engine, whose error names the server (password masked)."""
        schemes, form = _URL_FORMS[info.field_name or ""]
        parts = urlsplit(value or "")
        if value is not None and (parts.scheme not in schemes or not parts.hostname):
            raise ValueError(f"must be {form}")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        """Only the form: whether this machine has the GPU is the engine's to say (transformers_engine.resolve_device),
        as only a process that loads the model needs one."""
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N (the GPU's index, as in cuda:1) or mps")
        return value

    @field_validator("personas_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        """`~` as the shell would expand it: .env and hermes.yaml pass it on as a folder named `~`."""
        return Path(os.path.expanduser(value))

    @field_validator("shard_ids", mode="before")
    @classmethod
    def _comma_separated_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()] or None
        return value

    @model_validator(mode="after")
    def _shards_within_count(self) -> Settings:
        if self.shard_ids is not None:
            if self.shard_count is None:
                raise ValueError("HERMES_SHARD_IDS needs HERMES_SHARD_COUNT (the total over all bot processes)")
            outside = [i for i in self.shard_ids if not 0 <= i < self.shard_count]
            if outside:
                raise ValueError(f"HERMES_SHARD_IDS {outside} outside 0..{self.shard_count - 1} (HERMES_SHARD_COUNT)")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(dotenv_settings, DotEnvSettingsSource)
        dotenv = _CheckedDotEnv(
            settings_cls, env_file=dotenv_settings.env_file, env_file_encoding=dotenv_settings.env_file_encoding
        )
        # HERMES_CONFIG_FILE may be in .env too, which is where people put what they would export.
        # env_vars holds .env's names lowercased (case-insensitive, as pydantic-settings reads them).
        yaml_file = os.environ.get(YAML_FILE_ENV) or dotenv.env_vars.get(YAML_FILE_ENV.lower())
        return (
            init_settings, _PublicNamesOnly(env_settings), _PublicNamesOnly(dotenv), _YamlSource(settings_cls, yaml_file)
        )

    def secrets(self) -> list[str]:
        """Values that must never appear in logs: the token, the key and every URL's password, also as
        percent-decoded (the form clients send, and may print, once they have parsed the URL)."""
        found = [s.get_secret_value() for s in (self.discord_token, self.openai_api_key) if s is not None]
        for url in (self.openai_base_url, self.database_url, self.queue_url):
            # Redacted wherever it appears only when long enough to mean nothing else: "hermes" (compose's
            # default) or "0" would blank a persona's name or every zero. In a URL any password is masked
            # (logging_setup's URL pattern).
            if url and (match := _URL_PASSWORD.search(url)) and len(match[2]) >= MIN_REDACTED_PASSWORD:
                found.extend({match[2], unquote(match[2])})
        return [s for s in found if s]


class _PublicNamesOnly(PydanticBaseSettingsSource):
    """The environment (or .env) as seen through the public names only. With populate_by_name,
    pydantic-settings also reads a field's own name there, case-insensitively: a platform's DATABASE_URL
    or LOG_LEVEL would become one of our settings."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self.source = source

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        public = set(_public_names())
        return {key: value for key, value in self.source().items() if key in public}


class _CheckedDotEnv(DotEnvSettingsSource):
    """.env, as strict as hermes.yaml about our names: a misspelt HERMES_* name, or a setting given twice
    (python-dotenv keeps the last), stops the start instead of running on other values than written.
    Other names pass: docker compose reads POSTGRES_PASSWORD and TORCH_CUDA from the same file."""

    def _read_env_file(self, file_path: Path) -> Mapping[str, str | None]:
        with open(file_path, encoding=self.env_file_encoding or "utf-8") as stream:
            bindings = list(parse_stream(stream))
        known = [*_public_names(), YAML_FILE_ENV]
        first_line: dict[str, int] = {}
        problems = []
        for binding in bindings:
            if binding.key is None:  # a comment, a blank line, or a line python-dotenv cannot parse
                continue
            name, line = binding.key.upper(), _line_of(binding)  # names are case-insensitive, as pydantic reads them
            if name.startswith("HERMES_") and name not in known:
                problems.append(f"{file_path}: unknown setting {binding.key}{_did_you_mean(name, known)}")
            elif name in first_line:
                problems.append(f"{file_path}:{line}: duplicate setting {binding.key} (first on line {first_line[name]})")
            elif name in known and binding.value:  # an empty line from .env.example may be filled in further down
                first_line[name] = line
        if problems:
            raise SettingsError(problems)
        return super()._read_env_file(file_path)


def _line_of(binding: Binding) -> int:
    """The line a binding's name is on: python-dotenv counts from the blank lines before it."""
    text = binding.original.string
    return binding.original.line + text[: len(text) - len(text.lstrip())].count("\n")


class _YamlSource(PydanticBaseSettingsSource):
    """Reads `hermes.yaml` when present, or HERMES_CONFIG_FILE (environment or .env), which must exist (a
    mistyped path would otherwise run on the defaults without a word); keys are setting names."""

    def __init__(self, settings_cls: type[BaseSettings], named: str | None) -> None:
        super().__init__(settings_cls)
        self.named = named
        self.path = Path(os.path.expanduser(named or DEFAULT_YAML_FILE))

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path.is_file():
            if self.named:
                raise SettingsError([f"{YAML_FILE_ENV}: no such file: {self.path}"])
            return {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(self.path, exc) from None
        try:
            data = strict_yaml.load(text) or {}
        except yaml.YAMLError as exc:
            line, problem = strict_yaml.where_and_what(exc, text)
            where = f"{self.path}:{line}" if line else str(self.path)
            raise SettingsError([f"{where}: not valid YAML: {problem}"]) from None
        if not isinstance(data, dict):
            raise SettingsError([f"{self.path}: must be a mapping of setting names to values"])
        public = _public_names()
        unknown = [str(key) for key in data if str(key) not in {*public, *Settings.model_fields}]
        if unknown:
            raise SettingsError([f"{self.path}: unknown setting {key}{_did_you_mean(key, public)}" for key in unknown])
        # An empty value counts as not set, as in the environment and .env (env_ignore_empty): the default applies.
        return {str(key): value for key, value in data.items() if value not in (None, "")}


MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")  # any one: AutoTokenizer finds its class


def local_model_dir(model: str, needs: tuple[str, ...] = MODEL_FILES) -> Path | None:
    """The folder `model` names, `~` expanded, or None for a Hugging Face id. A value that looks like a path
    (`/`, `./`, `../`, `~`, or existing) must be a folder holding one of `needs`: transformers takes a missing
    one for a malformed hub id, and an empty one for a model whose tokenizer needs sentencepiece or tiktoken.
    ValueError says what is wrong."""
    path = Path(os.path.expanduser(model))
    if not (model.startswith(("/", "./", "../", "~")) or path.exists()):
        return None
    if not path.is_dir():
        raise ValueError("not a directory" if path.exists() else "no such directory")
    if not any((path / name).is_file() for name in needs):
        raise ValueError(f"holds no model (no {' or '.join(needs)})")
    return path


def not_utf8(exc: UnicodeDecodeError) -> tuple[int, str]:
    """The line of a text file's first byte that is not UTF-8, and the problem: a file saved as Latin-1 or
    UTF-16 by an editor (settings and persona files say it alike)."""
    line = exc.object.count(b"\n", 0, exc.start) + 1
    return line, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8"


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> SettingsError:
    line, problem = not_utf8(exc)
    return SettingsError([f"{path}:{line}: {problem}"])


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name.upper(), known, n=1)
    return f" (did you mean {close[0]}?)" if close else " (README.md, Configuration, lists them all)"


def _public_name(field_name: str) -> str:
    alias = Settings.model_fields[field_name].validation_alias
    assert isinstance(alias, AliasChoices)
    return str(alias.choices[0])


@functools.cache
def _public_names() -> list[str]:
    """Every setting's public name, sorted (the environment and hermes.yaml are read by these)."""
    return sorted(_public_name(name) for name in Settings.model_fields)


_SECRET_SETTINGS = {"DISCORD_TOKEN", "HERMES_OPENAI_API_KEY"}


# A URL's user and password; greedy up to the last "@", as a password may hold "/" or "@" (base64 secrets do).
_URL_PASSWORD = re.compile(r"(://[^/@:]*):(.*)@")
MIN_REDACTED_PASSWORD = 8


def without_password(value: Any) -> Any:
    """A URL's password masked (`postgresql://hermes:***@db/hermes`): error lines end up in logs."""
    return _URL_PASSWORD.sub(r"\1:***@", value) if isinstance(value, str) else value


def load_settings(**overrides: Any) -> Settings:
    """Build Settings or raise SettingsError with one line per invalid setting."""
    try:
        return Settings(**overrides)
    except UnicodeDecodeError as exc:  # only .env is decoded outside _YamlSource (the environment is text)
        raise _not_utf8(Path(str(Settings.model_config["env_file"])), exc) from None
    except OSError as exc:  # hermes.yaml or .env exists but cannot be read (permissions, a broken mount)
        raise SettingsError([f"{exc.filename}: cannot read: {exc.strerror}"]) from None
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if not error["loc"]:  # a rule across settings: its message names them
                lines.append(f"invalid settings: {error['msg'].removeprefix('Value error, ')}")
                continue
            field = str(error["loc"][0])
            name = _public_name(field) if field in Settings.model_fields else field
            value = error.get("input")
            hidden = isinstance(value, dict) or name in _SECRET_SETTINGS
            shown = "" if hidden else f" (got {without_password(value)!r})"
            lines.append(f"invalid setting {name}: {error['msg'].removeprefix('Value error, ')}{shown}")
        raise SettingsError(lines) from None
