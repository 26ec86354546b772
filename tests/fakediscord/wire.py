"""What goes over HTTP: Discord's JSON error shape, exact JSON content type, message flags."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from tests.fakediscord.models import RecordedRequest

EPHEMERAL_FLAG = 64
LOADING_FLAG = 128
RECORD = web.RequestKey("record", RecordedRequest)


class ApiError(Exception):
    """Raised by handlers and world operations; answered as Discord's JSON error shape."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """discord.py parses JSON only when Content-Type is exactly application/json (no charset)."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
