"""Deployment files, checked without a Docker engine: the Compose schema, and agreement with the code.

The Compose Specification schema is a copy in tests/data/ (compose-spec/compose-spec at 170098b,
Apache-2.0: its licence and NOTICE lie beside it), so a clone tests on its own.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from sqlalchemy.engine import make_url

from bot.cli import build_parser
from bot.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
BASE = ROOT / "docker-compose.yml"
OPENAI = ROOT / "docker-compose.openai.yml"
VLLM = ROOT / "docker-compose.vllm.yml"

SETTING_NAMES = {str(field.validation_alias.choices[0]) for field in Settings.model_fields.values()}  # type: ignore[union-attr]
OUR_IMAGES = {"hermes-bot:latest", "hermes-bot:gpu"}


class _Reset:
    """Compose's `!reset` tag: the override removes the base value."""


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus the override tags Compose understands (`!reset`, `!override`)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: {"__override__": loader.construct_object(node, deep=True)},  # type: ignore[arg-type]
)


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)


def merge(base: Any, override: Any) -> Any:
    """Compose's override merge for the parts used here: mappings merge, other values replace."""
    if isinstance(override, _Reset):
        return _Reset()
    if isinstance(override, dict) and "__override__" in override:
        return override["__override__"]
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge(base.get(key), value)
            if isinstance(result, _Reset):
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    return override


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """`${VAR}`, `${VAR:-default}` and `${VAR:?error}` as Compose resolves them, from `env` only."""
    env = env or {}

    def sub(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", sub, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return load(BASE)


@pytest.fixture(scope="module")
def with_openai(base: dict[str, Any]) -> dict[str, Any]:
    return merge(base, load(OPENAI))


@pytest.fixture(scope="module")
def with_vllm(with_openai: dict[str, Any]) -> dict[str, Any]:
    return merge(with_openai, load(VLLM))


@pytest.fixture(scope="module")
def variants(base, with_openai, with_vllm) -> list[dict[str, Any]]:
    """Every way the README tells people to run compose."""
    return [base, with_openai, with_vllm]


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") in OUR_IMAGES}


def test_compose_files_match_the_compose_schema(schema, variants) -> None:
    jsonschema.Draft7Validator.check_schema(schema)
    for compose in variants:
        jsonschema.Draft7Validator(schema).validate(compose)


def test_schema_check_is_not_vacuous(schema, base) -> None:
    broken = merge(base, {"services": {"redis": {"healthcheck": {"interval": 5}}}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_every_hermes_and_discord_variable_is_a_real_setting(variants) -> None:
    for compose in variants:
        for name, service in compose["services"].items():
            for key in environment(service):
                if key.startswith(("HERMES_", "DISCORD_")):
                    assert key in SETTING_NAMES, f"service {name} sets {key}, which bot/config.py does not define"


def test_every_command_exists_in_the_cli(variants) -> None:
    parser = build_parser()
    commands = set()
    for compose in variants:
        for name, service in app_services(compose).items():
            command = service["command"]
            argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
            parser.parse_args(argv)  # exits (SystemExit) on an unknown command
            commands.add((name, argv[0]))
    assert {("bot", "run"), ("worker", "worker"), ("migrate", "db")} <= commands


def test_settings_in_compose_validate(variants) -> None:
    for compose in variants:
        for service in app_services(compose).values():
            env = {k: v for k, v in environment(service).items() if k in SETTING_NAMES}
            Settings(**env)  # raises on a value the program would refuse at start


def test_service_urls_point_at_the_services(base) -> None:
    services = base["services"]
    postgres = services["postgres"]
    pg_env = environment(postgres)
    assert services["redis"]["image"].startswith("redis:")
    assert postgres["image"].startswith("postgres:")
    for name, service in app_services(base).items():
        env = environment(service)
        queue = make_url(env["HERMES_QUEUE_URL"])
        assert (queue.drivername, queue.host, queue.port or 6379) == ("redis", "redis", 6379), name
        db = make_url(env["HERMES_DATABASE_URL"])
        assert db.drivername == "postgresql+asyncpg", name
        assert (db.host, db.port or 5432) == ("postgres", 5432), name
        assert (db.username, db.password, db.database) == (
            pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"]
        ), name


def test_dependencies_wait_for_health_and_migration(base) -> None:
    services = base["services"]
    for name in ("postgres", "redis"):
        assert "test" in services[name]["healthcheck"], name
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    conditions = {
        name: {dep: spec["condition"] for dep, spec in svc.get("depends_on", {}).items()}
        for name, svc in services.items()
    }
    assert conditions["migrate"] == {"postgres": "service_healthy"}
    assert conditions["bot"] == {
        "postgres": "service_healthy", "redis": "service_healthy", "migrate": "service_completed_successfully"
    }
    assert conditions["worker"]["redis"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"


def test_gpu_worker_reserves_a_gpu_and_caches_models(base) -> None:
    worker = base["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["build"]["args"]["TORCH"] == "cuda"
    hf_home = environment(worker)["HF_HOME"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert mounts[hf_home] in base["volumes"]


def test_openai_override_swaps_the_gpu_worker(with_openai) -> None:
    worker = with_openai["services"]["worker"]
    env = environment(worker)
    assert env["HERMES_ENGINE"] == "openai"
    assert make_url(env["HERMES_OPENAI_BASE_URL"]).host == "host.docker.internal"
    assert "host.docker.internal:host-gateway" in worker["extra_hosts"]
    assert "deploy" not in worker and "volumes" not in worker
    assert worker["build"]["args"]["TORCH"] == "cpu"
    # The URLs that join the services survive the override.
    assert env["HERMES_QUEUE_URL"] == "redis://redis:6379/0"


def test_vllm_override_points_workers_at_the_vllm_service(with_vllm) -> None:
    services = with_vllm["services"]
    worker, vllm = services["worker"], services["vllm"]
    env = environment(worker)
    assert env["HERMES_ENGINE"] == "openai"
    url = make_url(env["HERMES_OPENAI_BASE_URL"])
    assert url.host == "vllm" and str(url.port) in vllm["expose"]
    assert env["HERMES_MODEL"] in vllm["command"]
    assert worker["depends_on"]["vllm"]["condition"] == "service_healthy" and "test" in vllm["healthcheck"]
    assert "deploy" not in worker and "extra_hosts" not in worker
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


@pytest.mark.parametrize("dotenv", [{}, {"HERMES_CONTEXT_TOKENS": "16384"}, {"HERMES_CONTEXT_TOKENS": "4096"}])
def test_vllm_override_gives_workers_no_more_context_than_vllm_serves(with_vllm, dotenv: dict[str, str]) -> None:
    """vLLM refuses (400) a prompt that with the reply is longer than --max-model-len: a worker fitting prompts
    to a larger HERMES_CONTEXT_TOKENS (from .env, when the override does not set it) has long scenes fail."""
    worker, vllm = with_vllm["services"]["worker"], with_vllm["services"]["vllm"]
    assert "HERMES_CONTEXT_TOKENS" in worker["environment"], "the worker's context would come from .env, unchecked"
    context = int(interpolate(str(worker["environment"]["HERMES_CONTEXT_TOKENS"]), dotenv))
    command = [interpolate(str(arg), dotenv) for arg in vllm["command"]]
    assert context <= int(command[command.index("--max-model-len") + 1])


def test_healthchecks_probe_the_metrics_port(base) -> None:
    for name, service in app_services(base).items():
        if name == "migrate":
            continue
        port = environment(service)["HERMES_METRICS_PORT"]
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in probe, name
        assert port in service["expose"], name


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_runs_real_commands_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    last = {keyword: rest for keyword, rest in instructions}
    entrypoint, cmd = json.loads(last["ENTRYPOINT"]), json.loads(last["CMD"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert entrypoint == ["hermes-bot"] and "hermes-bot" in scripts
    build_parser().parse_args(cmd)
    assert cmd == ["run"]
    assert last["USER"] not in {"root", "0"}
    # USER comes after every RUN, so nothing at runtime is root-owned work.
    keywords = [k for k, _ in instructions]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_dockerfile_copies_what_exists_and_pins_the_project_torch() -> None:
    instructions = dockerfile_instructions()
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    torch_installs = [rest for keyword, rest in instructions if keyword == "RUN" and "install torch" in rest]
    assert len(torch_installs) == 2  # the CPU and the CUDA stage
    for install in torch_installs:
        assert torch_pin in install.split()
    stages = {rest.split(" AS ")[-1] for keyword, rest in instructions if keyword == "FROM"}
    for compose in (load(BASE), merge(load(BASE), load(OPENAI))):
        for service in app_services(compose).values():
            assert f"torch-{service['build']['args']['TORCH']}" in stages


def test_env_example_lists_every_setting() -> None:
    names = set()
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            names.add(match.group(1))
    missing = SETTING_NAMES - names
    assert not missing, f".env.example lacks {sorted(missing)}"
    unknown = {n for n in names if n.startswith(("HERMES_", "DISCORD_"))} - SETTING_NAMES
    assert not unknown, f".env.example names settings that do not exist: {sorted(unknown)}"


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".env", "hermes.yaml", "data/", ".venv/", ".git/"} <= ignored
