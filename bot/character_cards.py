"""Import character cards (SillyTavern / TavernAI, spec V1, V2 and V3; JSON, PNG or CHARX) as persona YAML.

Role-play communities keep their characters as cards; importing one turns it into a persona file
that the registry validates like any other. A PNG card carries its JSON base64-encoded in a text
chunk named `chara` (V1/V2) or `ccv3` (V3): `tEXt` as SillyTavern writes it, or the compressed `zTXt`
and international `iTXt` that other PNG tools may rewrite it as. A CHARX (V3) is a zip holding the card as
`card.json` beside its assets. The card's macros become plain text: `{{char}}` the
character's name, `{{user}}` "the user" in the prompt and "friend" in dialogue (greeting, examples),
since a Discord channel has many users and the card knows none of them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import json
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from bot.personas import one_line, plain_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"  # a CHARX
CARD_CHUNKS = ("ccv3", "chara")  # V3 first: a V3 PNG also keeps a V2 copy under "chara"
MAX_CARD_TEXT = 16 * 2**20  # a compressed chunk is inflated up to this many bytes, no further
# A JSON or PNG card is read whole: room for a card's text as large as MAX_CARD_TEXT and an avatar image
# (real cards are a few MB). A CHARX is not read whole (its directory, then card.json), so its assets may be large.
MAX_CARD_FILE = 32 * 2**20
READ_BLOCK = 2**16
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
DIALOGUE_USER = "friend"
CHAR_MACRO = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
USER_MACRO = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)
NOT_A_NAME = {"the", "a", "an", "old", "young", "my"}  # a name starting with one of these gets no wake word
# Titles, ranks and honorifics before a name: "Captain Mira Vance" answers to "mira", not to "captain".
TITLES = frozenset("""
    mr mrs ms miss madam madame sir dame lady lord master mistress dr doctor prof professor detective agent
    officer captain capt lieutenant lt sergeant sgt general commander cmdr admiral major colonel col private
    king queen prince princess emperor empress duke duchess baron baroness count countess earl
    father mother sister brother aunt auntie uncle saint st
""".split())
DEFAULT_INSTRUCTION = "Write {name}'s next reply in a fictional chat with the people here. Stay in character as {name}."


class CardError(ValueError):
    """A file is not a character card we can read; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def read_card(path: Path) -> dict[str, Any]:
    """The card's fields (V2/V3 `data`, or a V1 card's top level) from a JSON, PNG or CHARX file.

    A PNG's `ccv3` chunk is read first; when it is not a card we can read, its V2 copy in `chara` is.
    """
    try:
        with path.open("rb") as file:
            charx = file.peek(len(ZIP_SIGNATURE)).startswith(ZIP_SIGNATURE)
            raw = b"" if charx else _read_at_most(file, MAX_CARD_FILE)
    except OSError as exc:
        raise CardError(path, f"cannot read: {exc}") from None
    if charx:
        return _card_fields(path, _charx_card(path))
    if len(raw) > MAX_CARD_FILE:
        raise CardError(path, f"larger than {MAX_CARD_FILE // 2**20} MiB, too large for a character card")
    if not raw.startswith(PNG_SIGNATURE):
        return _card_fields(path, raw.decode("utf-8-sig", errors="replace"))
    chunks = _png_card_chunks(path, raw)
    problems: list[CardError] = []
    for keyword in (k for k in CARD_CHUNKS if k in chunks):
        try:
            return _card_fields(path, _base64_text(path, keyword, _chunk_text(path, keyword, *chunks[keyword])))
        except CardError as exc:
            problems.append(exc)
    if problems:
        raise problems[0]
    raise CardError(path, "a PNG without a character card (no 'chara' or 'ccv3' text chunk)")


def _read_at_most(file: BinaryIO, limit: int) -> bytes:
    """The file's bytes, but no more than one block past `limit` (it may be endless, a pipe). In blocks:
    one `read(limit)` would allocate `limit` bytes for a file of any size."""
    blocks = iter(functools.partial(file.read, READ_BLOCK), b"")
    return b"".join(itertools.islice(blocks, limit // READ_BLOCK + 1))


def _card_fields(path: Path, text: str) -> dict[str, Any]:
    try:
        card = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError(path, f"not a character card: invalid JSON ({exc})") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise CardError(path, "not a character card: its JSON is nested too deeply") from None
    data = card.get("data") if isinstance(card, dict) and isinstance(card.get("data"), dict) else card
    if not isinstance(data, dict) or not one_line(str(data.get("name") or "")):
        raise CardError(path, "not a character card: it has no name")
    if not isinstance(data["name"], str):
        raise CardError(path, f"not a character card: its name is not text (got {type(data['name']).__name__})")
    return data


def _charx_card(path: Path) -> str:
    """The `card.json` of a CHARX, read no further than MAX_CARD_TEXT (a zip can inflate without bound)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("card.json") as card:
            data = card.read(MAX_CARD_TEXT + 1)
    except KeyError:
        raise CardError(path, "a CHARX without card.json") from None
    except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as exc:  # + Deflate64, a password
        raise CardError(path, f"not a readable CHARX (zip): {exc}") from None
    if len(data) > MAX_CARD_TEXT:
        raise CardError(path, f"card.json inflates past {MAX_CARD_TEXT // 2**20} MiB")
    return data.decode("utf-8-sig", errors="replace")


def _base64_text(path: Path, keyword: str, value: bytes) -> str:
    try:
        return base64.b64decode(value, validate=False).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise CardError(path, f"the PNG's {keyword!r} chunk is not base64 JSON ({exc})") from None


def _png_card_chunks(path: Path, raw: bytes) -> dict[str, tuple[bytes, bytes]]:
    """The first text chunk (`tEXt`, `zTXt`, `iTXt`) of each keyword in CARD_CHUNKS, as its type and value;
    SillyTavern too reads the first. None is inflated here, and other chunks never are: a small PNG can hold
    many that each inflate to MAX_CARD_TEXT. A card is read inflating one chunk at a time, two at most.
    A file cut short before its card chunks is said to be so (its card text would not decode, or be missing)."""
    found: dict[str, tuple[bytes, bytes]] = {}
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[offset : offset + 8])
        body = raw[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if len(body) < length:
            break
        if kind == b"IEND":
            return found
        if kind not in TEXT_CHUNKS or b"\x00" not in body:
            continue
        keyword, value = body.split(b"\x00", 1)
        if (name := keyword.decode("latin-1").lower()) in CARD_CHUNKS:
            found.setdefault(name, (kind, value))
    if not found:  # no IEND: the file stops early, maybe right before its card
        raise CardError(path, "the PNG is cut short (it ends before its last chunk); download it again")
    return found


def _chunk_text(path: Path, keyword: str, kind: bytes, value: bytes) -> bytes:
    """A text chunk's text, inflated when compressed, no further than MAX_CARD_TEXT bytes."""
    if kind == b"zTXt":  # compression method byte, then zlib data
        return _inflate(path, keyword, value[1:])
    if kind == b"iTXt":  # compressed flag, method, language tag NUL, translated keyword NUL, text
        compressed, text = value[:1] == b"\x01", value[2:].split(b"\x00", 2)[-1]
        return _inflate(path, keyword, text) if compressed else text
    return value


def _inflate(path: Path, keyword: str, data: bytes) -> bytes:
    """zlib data inflated, refusing more than MAX_CARD_TEXT bytes (a small chunk can inflate to gigabytes)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_CARD_TEXT)
    except zlib.error as exc:
        raise CardError(path, f"the PNG's {keyword!r} chunk is not readable compressed text ({exc})") from None
    if inflater.unconsumed_tail:
        raise CardError(path, f"the PNG's {keyword!r} chunk inflates past {MAX_CARD_TEXT // 2**20} MiB")
    return out


def card_to_persona(card: dict[str, Any]) -> dict[str, Any]:
    """Persona fields (as a persona YAML file holds them) for a card's fields. A V3 card's `nickname`,
    what the character is called in chat, is the persona's name and its `{{char}}` (the spec's rule)."""
    nickname = card.get("nickname")  # text only: a list or mapping would become the name "['Mira']"
    name = (one_line(nickname) if isinstance(nickname, str) else "") or one_line(card["name"])

    def plain(field: str, user: str = "the user") -> str:
        return _fill(plain_text(str(card.get(field) or "")).strip(), name, user)

    instruction = DEFAULT_INSTRUCTION.format(name=name)
    own = plain("system_prompt")
    always, lore = _book(card.get("character_book"), name)
    personality, scenario = plain("personality"), plain("scenario")
    parts = [
        re.sub(r"\{\{original\}\}", lambda _: instruction, own, flags=re.I) if own else instruction,
        plain("description"),
        f"{name}'s personality: {personality}" if personality else "",
        f"Scenario: {scenario}" if scenario else "",
        *always,
    ]
    persona: dict[str, Any] = {
        "name": name[:80],
        "description": _first_line(plain("creator_notes")) or f"{name}, imported from a character card.",
        "system_prompt": "\n\n".join(part for part in parts if part),
    }
    if greeting := plain("first_mes", user=DIALOGUE_USER):
        persona["greeting"] = greeting
    if examples := _examples(str(card.get("mes_example") or ""), name):
        persona["examples"] = examples
    persona["wake_words"] = _wake_words(name)
    if lore:
        persona["lore"] = lore
    # `{{original}}` stands for the app's own post-history prompt, which hermes-bot has none of.
    if reminder := re.sub(r"\{\{original\}\}", "", plain("post_history_instructions"), flags=re.I).strip():
        persona["reminder"] = reminder
    return persona


def _wake_words(name: str) -> list[str]:
    """A short form of the name that addresses the persona: its first word ("Mira Vance" answers to "mira",
    "Captain Mira Vance" too, past the title). None when that word would catch ordinary sentences: an
    article ("The Narrator" must not answer every "the ..."), or the one word after a title ("Dr. Who",
    "Doctor Strange": "who", "strange"). A one-word name needs none (the name wakes the persona), unless
    symbols dress it ("🦊 Kitsune" answers to "kitsune")."""
    words = [word for word in re.split(r"\W+", name.lower()) if word]
    rest = list(itertools.dropwhile(lambda word: word in TITLES, words))
    if not rest or (len(rest) == 1 and (rest != words or rest[0] == name.strip().lower())):
        return []
    first = rest[0]
    return [first] if len(first) >= 3 and first not in NOT_A_NAME else []


def _book(book: Any, name: str) -> tuple[list[str], list[dict[str, Any]]]:
    """A card's embedded lorebook: entries marked `constant` (always true), and keyed lore entries.

    Disabled entries and keyed entries without keys are left out.
    """
    always: list[str] = []
    lore: list[dict[str, Any]] = []
    entries = book.get("entries") if isinstance(book, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("enabled") is False:
            continue
        content = _fill(plain_text(str(entry.get("content") or "")).strip(), name, "the user")
        raw = entry.get("keys") or []
        raw = raw.split(",") if isinstance(raw, str) else raw  # some cards give "forest, glade"
        texts = [plain_text(str(key)).strip() for key in raw] if isinstance(raw, list) else []
        # A key naming the user can match no one's real name: left out; "{{char}}'s ship" is the name's.
        keys = [_fill(key, name, "") for key in texts if key and not USER_MACRO.search(key)]
        if not content:
            continue
        if entry.get("constant"):
            always.append(content)
        elif keys:
            lore.append({"keys": keys, "content": content})
    return always, lore


def _fill(text: str, name: str, user: str) -> str:
    """The card's macros as plain text: `{{char}}`/`<BOT>` the name, `{{user}}`/`<USER>` `user`."""
    # Functions as replacements: a name is text, never a template (`Dr. \1` must not read as a group).
    return USER_MACRO.sub(lambda _: user, CHAR_MACRO.sub(lambda _: name, text))


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _examples(text: str, name: str) -> list[dict[str, Any]]:
    """`<START>`-separated example chats whose lines start with `{{user}}:` or `{{char}}:`. Each chat after
    the first starts with a line marked `start: true`, so the prompt keeps them apart instead of running them
    together as one conversation; text between a `<START>` and the chat's first line belongs to no line."""
    speaker = re.compile(r"^\s*(\{\{user\}\}|<USER>|\{\{char\}\}|<BOT>)\s*:\s*", re.I)
    chats: list[list[dict[str, str]]] = [[]]
    for line in plain_text(text).splitlines():
        if line.strip().upper() == "<START>":
            chats.append([])
            continue
        match = speaker.match(line)
        if match:
            role = "user" if match.group(1).lower() in ("{{user}}", "<user>") else "assistant"
            chats[-1].append({"role": role, "content": line[match.end() :]})
        elif chats[-1] and line.strip():
            chats[-1][-1]["content"] += "\n" + line
    examples: list[dict[str, Any]] = []
    for chat in chats:
        turns = [{**turn, "content": _fill(turn["content"], name, DIALOGUE_USER).strip()} for turn in chat]
        turns = [turn for turn in turns if turn["content"]]
        if turns and examples:
            turns[0] = {"start": True, **turns[0]}
        examples += turns
    return examples


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so the imported prompt reads like a hand-written persona."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def persona_yaml(persona: dict[str, Any], source: Path) -> str:
    """The persona file's text, with a comment naming the card it came from."""
    body = yaml.dump(persona, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100)
    name = "".join(c if c.isprintable() else "?" for c in source.name)  # a newline would end the comment
    return f"# Imported from the character card {name}; edit freely.\n{body}"
