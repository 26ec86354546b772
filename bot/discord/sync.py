"""Register the slash commands with Discord only when Discord's copy differs from ours.

A bulk overwrite on every start spends Discord's daily budget of command writes (discord.py's docs
warn against syncing in `setup_hook` for this reason), and with several shard processes every one of
them would do it. Comparing costs one GET. Only the parts of a command we set are compared, with
Discord's defaults filled in, so a change to a name, description, option (its type, choices, bounds,
channel types, autocomplete) or permission syncs. Not compared: where a command may be used (`contexts`,
`integration_types`), whose defaults Discord fills in its own way; change one of those together with
something compared, or the change waits for the next one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from discord import app_commands

log = logging.getLogger(__name__)


def command_signature(payload: Mapping[str, Any]) -> str:
    """A command's JSON reduced to what we define, normalised the same way for ours and Discord's."""

    def option(o: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "name": o["name"],
            "description": o.get("description", ""),
            "type": o.get("type", 1),
            "required": bool(o.get("required", False)),
            "choices": sorted((c["name"], str(c["value"])) for c in o.get("choices") or []),
            "options": [option(sub) for sub in o.get("options") or []],
            "autocomplete": bool(o.get("autocomplete", False)),
            "channel_types": sorted(o.get("channel_types") or []),
            **{bound: o.get(bound) for bound in ("min_value", "max_value", "min_length", "max_length")},
        }

    command = option(payload) | {
        "default_member_permissions": payload.get("default_member_permissions"),
        "nsfw": bool(payload.get("nsfw", False)),
    }
    return json.dumps(command, sort_keys=True)


async def sync_if_changed(tree: app_commands.CommandTree[Any]) -> bool:
    """Bulk-overwrite the global commands when they differ from Discord's; True when it synced."""
    ours = sorted(command_signature(c.to_dict(tree)) for c in tree.get_commands())
    theirs = sorted(command_signature(c.to_dict()) for c in await tree.fetch_commands())
    if ours == theirs:
        log.info("slash commands unchanged; not syncing")
        return False
    await tree.sync()
    log.info("slash commands synced (%d)", len(ours))
    return True
