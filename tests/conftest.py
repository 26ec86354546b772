"""Shared fixtures: real redis-server and PostgreSQL (one each per test session), the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import postgres_server, redis_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Mistral + ChatML tokenizer, built offline once per session."""
    from bot.devtools import write_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    write_tiny_model(path)
    return path


@pytest.fixture
def personas_dir() -> Path:
    return ROOT / "personas"
