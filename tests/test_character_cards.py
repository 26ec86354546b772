"""Character cards (SillyTavern / TavernAI) imported as personas: JSON and PNG, V1 and V2, and bad files."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
import yaml

from bot.character_cards import card_to_persona, read_card
from bot.cli import main
from bot.personas import PersonaRegistry
from bot.prompt import EXAMPLES_END, ChatTurn, build_messages

ROOT = Path(__file__).resolve().parent.parent

CARD_V2 = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Captain Mira Vance",
        "description": "{{char}} commands the salvage ship Gull. She owes {{user}} a favour.",
        "personality": "dry, loyal, impatient with fools",
        "scenario": "The Gull drifts near a derelict station.",
        "first_mes": "*{{char}} glances up.* You're late, {{user}}.",
        "mes_example": (
            "<START>\n{{user}}: What's our heading?\n{{char}}: Wherever the scrap is.\nAnd quickly.\n"
            "<START>\n{{user}}: Can we trust them?\n{{char}}: No, {{user}}."
        ),
        "creator_notes": "A salvage captain for sci-fi scenes.\nSecond line of notes.",
        "system_prompt": "",
        "tags": ["sci-fi"],
    },
}


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(*text_chunks: bytes) -> bytes:
    """A 1x1 PNG holding the given (already framed) text chunks."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(text_chunks) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def encoded(card: dict) -> bytes:
    return base64.b64encode(json.dumps(card).encode())


def png_card(card: dict, keyword: bytes = b"chara") -> bytes:
    """A 1x1 PNG with the card in a tEXt chunk, as SillyTavern writes it."""
    return png_with(chunk(b"tEXt", keyword + b"\x00" + encoded(card)))


@pytest.fixture
def personas_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "personas"
    monkeypatch.setenv("HERMES_PERSONAS_DIR", str(directory))
    return directory


def test_a_json_card_saved_with_a_byte_order_mark_imports(tmp_path: Path, personas_dir: Path) -> None:
    card = tmp_path / "mira.json"
    card.write_bytes(b"\xef\xbb\xbf" + json.dumps(CARD_V2).encode())
    assert main(["personas", "import", str(card)]) == 0
    assert PersonaRegistry.load(personas_dir).get("captain_mira_vance").name == "Captain Mira Vance"


def test_a_png_card_becomes_a_persona_the_registry_loads(
    tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "mira.png"
    card.write_bytes(png_card(CARD_V2))
    assert main(["personas", "import", str(card)]) == 0
    assert "as persona captain_mira_vance" in capsys.readouterr().out
    persona = PersonaRegistry.load(personas_dir).get("captain_mira_vance")
    assert persona.name == "Captain Mira Vance"
    assert persona.system_prompt.startswith("Write Captain Mira Vance's next reply")
    assert "Captain Mira Vance commands the salvage ship Gull. She owes the user a favour." in persona.system_prompt
    assert "personality: dry, loyal" in persona.system_prompt and "Scenario: The Gull drifts" in persona.system_prompt
    assert persona.greeting == "*Captain Mira Vance glances up.* You're late, friend."
    assert [(e.role, e.content, e.start) for e in persona.examples] == [  # two example chats, kept apart
        ("user", "What's our heading?", None),
        ("assistant", "Wherever the scrap is.\nAnd quickly.", None),
        ("user", "Can we trust them?", True),
        ("assistant", "No, friend.", None),
    ]
    assert persona.description == "A salvage captain for sci-fi scenes."
    assert persona.wake_words == ["mira"]  # not the title "captain"
    assert "{{" not in (personas_dir / "captain_mira_vance.yaml").read_text()


def test_a_v1_json_card_with_its_own_system_prompt(tmp_path: Path, personas_dir: Path) -> None:
    v1 = {"name": "Bo", "description": "A <BOT> who bakes.", "personality": "", "scenario": "",
          "first_mes": "", "mes_example": "<USER>: Bread?\n<BOT>: Always.",
          "system_prompt": "{{original}} Never break character."}
    card = tmp_path / "bo.json"
    card.write_text(json.dumps(v1))
    assert main(["personas", "import", str(card), "--id", "baker"]) == 0
    persona = PersonaRegistry.load(personas_dir).get("baker")
    assert persona.system_prompt == (
        "Write Bo's next reply in a fictional chat with the people here. Stay in character as Bo. "
        "Never break character.\n\nA Bo who bakes."
    )
    assert persona.greeting is None and persona.wake_words == []
    assert [(e.role, e.content) for e in persona.examples] == [("user", "Bread?"), ("assistant", "Always.")]


def test_a_v3_png_is_read_from_its_ccv3_chunk(tmp_path: Path, personas_dir: Path) -> None:
    v3 = {"spec": "chara_card_v3", "data": {**CARD_V2["data"], "name": "Nyx"}}
    card = tmp_path / "nyx.png"
    card.write_bytes(png_card(v3, keyword=b"ccv3"))
    assert main(["personas", "import", str(card)]) == 0
    assert PersonaRegistry.load(personas_dir).get("nyx").name == "Nyx"


def test_a_v3_nickname_is_the_persona_name_and_its_char(tmp_path: Path, personas_dir: Path) -> None:
    v3 = {"spec": "chara_card_v3", "data": {**CARD_V2["data"], "name": "Nyx the Night Cat (v3)", "nickname": "Nyx"}}
    card = tmp_path / "nyx.png"
    card.write_bytes(png_card(v3, keyword=b"ccv3"))
    assert main(["personas", "import", str(card)]) == 0
    persona = PersonaRegistry.load(personas_dir).get("nyx")
    assert persona.name == "Nyx" and "Nyx commands the salvage ship Gull" in persona.system_prompt


def test_a_v3_chunk_we_cannot_read_falls_back_to_the_v2_copy(tmp_path: Path, personas_dir: Path) -> None:
    card = tmp_path / "nyx.png"
    v2 = {**CARD_V2, "data": {**CARD_V2["data"], "name": "Nyx"}}
    card.write_bytes(png_with(chunk(b"tEXt", b"ccv3\x00" + base64.b64encode(b"{not json")), chunk(b"tEXt", b"chara\x00" + encoded(v2))))
    assert main(["personas", "import", str(card)]) == 0
    assert PersonaRegistry.load(personas_dir).get("nyx").name == "Nyx"


@pytest.mark.parametrize(
    "text_chunk",
    [
        chunk(b"zTXt", b"chara\x00\x00" + zlib.compress(encoded(CARD_V2))),
        chunk(b"iTXt", b"chara\x00\x00\x00en\x00Chara\x00" + encoded(CARD_V2)),
        chunk(b"iTXt", b"chara\x00\x01\x00\x00\x00" + zlib.compress(encoded(CARD_V2))),
    ],
    ids=["zTXt", "iTXt", "compressed iTXt"],
)
def test_a_card_rewritten_into_a_compressed_or_international_chunk_imports(
    tmp_path: Path, personas_dir: Path, text_chunk: bytes
) -> None:
    card = tmp_path / "mira.png"
    card.write_bytes(png_with(text_chunk))
    assert main(["personas", "import", str(card)]) == 0
    assert PersonaRegistry.load(personas_dir).get("captain_mira_vance").name == "Captain Mira Vance"


def test_a_compressed_chunk_that_inflates_without_end_is_not_read(
    tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.png"  # 17 KiB on disk, 17 MiB inflated: past the reader's cap
    bomb.write_bytes(png_with(chunk(b"zTXt", b"chara\x00\x00" + zlib.compress(b"A" * (17 * 2**20)))))
    assert main(["personas", "import", str(bomb)]) == 2
    assert "bomb.png: the PNG's 'chara' chunk inflates past 16 MiB" in capsys.readouterr().err


def test_chunks_other_than_the_card_are_never_inflated(tmp_path: Path) -> None:
    """Eight zTXt chunks of 2 KiB that inflate to 2 MiB each: 64 such chunks of 16 MiB, all inflated and
    kept, took a 1 MB PNG to a gigabyte of memory."""
    junk = [chunk(b"zTXt", b"junk%d\x00\x00" % i + zlib.compress(b"A" * 2**21)) for i in range(8)]
    card = tmp_path / "mira.png"
    card.write_bytes(png_with(*junk, chunk(b"tEXt", b"chara\x00" + encoded(CARD_V2))))
    tracemalloc.start()
    try:
        assert read_card(card)["name"] == "Captain Mira Vance"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_only_the_first_card_chunk_of_a_keyword_is_read(tmp_path: Path) -> None:
    """As SillyTavern does; more `chara` chunks after it are not inflated one after another."""
    later = {**CARD_V2, "data": {**CARD_V2["data"], "name": "Nyx"}}
    card = tmp_path / "mira.png"
    card.write_bytes(png_with(
        chunk(b"tEXt", b"chara\x00" + encoded(CARD_V2)), chunk(b"zTXt", b"chara\x00\x00" + zlib.compress(encoded(later)))
    ))
    assert read_card(card)["name"] == "Captain Mira Vance"


def test_a_file_larger_than_any_card_is_refused_before_it_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:  # sparse: no disk written
        file.write(b"\x89PNG\r\n\x1a\n")
        file.truncate(32 * 2**20 + 1)
    assert main(["personas", "import", str(huge)]) == 2
    assert "huge.png: larger than 32 MiB, too large for a character card" in capsys.readouterr().err


def test_json_nested_too_deeply_is_a_card_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = tmp_path / "deep.json"
    card.write_text('{"name": "Deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["personas", "import", str(card)]) == 2
    assert "deep.json: not a character card: its JSON is nested too deeply" in capsys.readouterr().err


def test_a_name_that_is_not_text_is_a_card_error(
    tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "list.json"
    card.write_text('{"name": ["Mira"], "description": "x"}')  # imported as the persona "['Mira']"
    assert main(["personas", "import", str(card)]) == 2
    assert "list.json: not a character card: its name is not text (got list)" in capsys.readouterr().err
    assert not personas_dir.exists()
    card.write_text('{"name": "Mira Vance", "nickname": ["Mira", "Cap"], "description": "x"}')  # V3's nickname
    assert main(["personas", "import", str(card)]) == 0
    assert PersonaRegistry.load(personas_dir).get("mira_vance").name == "Mira Vance"


def test_a_lone_surrogate_in_a_card_is_dropped(tmp_path: Path, personas_dir: Path) -> None:
    """JSON may escape half a UTF-16 pair; no UTF-8 file can hold it, and the error named the persona file."""
    card = tmp_path / "ann.json"
    card.write_text('{"name": "Ann\\ud800e", "description": "x\\udfff"}')
    assert main(["personas", "import", str(card)]) == 0
    persona = PersonaRegistry.load(personas_dir).get("anne")
    assert persona.name == "Anne" and "\udfff" not in persona.system_prompt


def test_control_characters_in_a_card_are_dropped_and_its_name_is_one_line(
    tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NUL cannot be stored in PostgreSQL, and escape sequences printed by `personas list` would set the
    operator's terminal title or clipboard. Format characters stay: the joiner in 👩‍🚀, a right-to-left mark."""
    card = tmp_path / "ada.json"
    card.write_text(json.dumps({
        "name": "👩\u200d🚀 Ada\r\nVance\x00",
        "creator_notes": "\x1b]52;c;ZWNobyBwd25lZA==\x07An astronaut\x1b[2K.",
        "description": "{{char}} flies\r\nthe Gull\x85.\tAlways.",
        "first_mes": "\u200fשלום\x7f",
        "mes_example": "<START>\r\n{{user}}: Hi\x00\r\n{{char}}: Hello\x07",
        "character_book": {"entries": [{"keys": ["Gull\x00", "\x07"], "content": "A ship\x9b."}]},
    }))
    assert main(["personas", "import", str(card)]) == 0
    persona = PersonaRegistry.load(personas_dir).get("ada_vance")
    assert persona.name == "👩\u200d🚀 Ada Vance"
    assert "Stay in character as 👩\u200d🚀 Ada Vance.\n\n👩\u200d🚀 Ada Vance flies\nthe Gull.\tAlways." in persona.system_prompt
    assert persona.greeting == "\u200fשלום"
    assert [(e.role, e.content) for e in persona.examples] == [("user", "Hi"), ("assistant", "Hello")]
    assert [(entry.keys, entry.content) for entry in persona.lore] == [(["Gull"], "A ship.")]
    written = yaml.safe_load((personas_dir / "ada_vance.yaml").read_text())  # as the file holds it, unvalidated
    assert not re.search(r"\\(x[0-9a-f]{2}|r)", repr(written))
    assert main(["personas", "list"]) == 0
    listed = capsys.readouterr().out
    assert "]52;c;ZWNobyBwd25lZA==An astronaut[2K." in listed and "\x1b" not in listed and "\x07" not in listed


def test_ids_from_accented_and_non_latin_names(tmp_path: Path, personas_dir: Path) -> None:
    for name, file_name, expected in (("Zoë Brontë", "card.json", "zoe_bronte"), ("ミラ", "mira-card.json", "mira_card")):
        card = tmp_path / file_name
        card.write_text(json.dumps({"spec": "chara_card_v2", "data": {"name": name, "description": "x"}}))
        assert main(["personas", "import", str(card)]) == 0
        assert PersonaRegistry.load(personas_dir).get(expected).name == name


def test_bad_cards_and_existing_ids_are_clear_errors(
    tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain_png = tmp_path / "photo.png"
    plain_png.write_bytes(png_card(CARD_V2, keyword=b"Comment"))
    assert main(["personas", "import", str(plain_png)]) == 2
    assert "photo.png: a PNG without a character card" in capsys.readouterr().err
    nameless = tmp_path / "nameless.json"
    nameless.write_text(json.dumps({"spec": "chara_card_v2", "data": {"description": "who?"}}))
    assert main(["personas", "import", str(nameless)]) == 2
    assert "nameless.json: not a character card: it has no name" in capsys.readouterr().err
    card = tmp_path / "mira.json"
    card.write_text(json.dumps(CARD_V2))
    assert main(["personas", "import", str(card)]) == 0
    assert main(["personas", "import", str(card)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["personas", "import", str(card), "--force"]) == 0
    assert main(["personas", "import", str(card), "--id", "Not An Id"]) == 2
    assert "--id 'Not An Id'" in capsys.readouterr().err and not (personas_dir / "Not An Id.yaml").exists()


def test_example_chats_stay_apart_in_the_prompt(tmp_path: Path, personas_dir: Path) -> None:
    """SillyTavern's <START> begins a new example chat: the prompt marks each one as an example instead of
    running them together into one conversation, and text before a chat's first line joins no other chat."""
    examples = ("<START>\n{{user}}: Heading?\n{{char}}: North.\n<START>\nA stray note.\n<START>\n"
                "{{char}}: *waves*\n{{user}}: Hi\n<START>\n{{user}}: \n<START>\n{{user}}: Trust them?\n{{char}}: No.")
    card = tmp_path / "mira.json"
    card.write_text(json.dumps({**CARD_V2, "data": {**CARD_V2["data"], "mes_example": examples}}))
    assert main(["personas", "import", str(card)]) == 0
    assert "start: true" in (personas_dir / "captain_mira_vance.yaml").read_text()
    persona = PersonaRegistry.load(personas_dir).get("captain_mira_vance")
    messages = build_messages(persona, [ChatTurn("user", "Hello")])
    intro = "[An example of how Captain Mira Vance talks, not part of the conversation]"
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("system", intro), ("user", "Heading?"), ("assistant", "North."),
        ("system", intro), ("assistant", "*waves*"), ("user", "Hi"),
        ("system", intro), ("user", "Trust them?"), ("assistant", "No."),
        ("system", EXAMPLES_END), ("user", "Hello"),
    ]


def test_a_cards_lorebook_becomes_lore_and_constant_entries_join_the_prompt(
    tmp_path: Path, personas_dir: Path
) -> None:
    book = {"entries": [
        {"keys": ["Gull", "{{char}}'s ship"], "content": "{{char}}'s ship, the Gull, leaks.", "enabled": True},
        {"keys": [], "content": "{{char}} never lies to {{user}}.", "constant": True},
        {"keys": ["{{user}}"], "content": "Only the user's name would trigger this."},
        {"keys": ["station"], "content": "A disabled note.", "enabled": False},
        {"keys": [], "content": "Keyless and not constant: nothing to trigger it."},
    ]}
    card = tmp_path / "mira.json"
    card.write_text(json.dumps({**CARD_V2, "data": {**CARD_V2["data"], "character_book": book}}))
    assert main(["personas", "import", str(card)]) == 0
    persona = PersonaRegistry.load(personas_dir).get("captain_mira_vance")
    assert [(entry.keys, entry.content) for entry in persona.lore] == [  # macros in keys: names, or left out
        (["Gull", "Captain Mira Vance's ship"], "Captain Mira Vance's ship, the Gull, leaks.")
    ]
    assert persona.system_prompt.endswith("Captain Mira Vance never lies to the user.")
    assert "disabled note" not in (personas_dir / "captain_mira_vance.yaml").read_text()


def test_an_article_or_title_is_not_made_a_wake_word(tmp_path: Path, personas_dir: Path) -> None:
    """A title before the name is skipped ("Captain Mira Vance" answers to "mira", not to every "captain"),
    but the one word after a title is no wake word: "Dr. Who" must not answer every "Who ...?"."""
    for name, expected in (
        ("The Narrator", []), ("Mira Vance", ["mira"]), ("Dr. John Watson", ["john"]), ("Lt. Sgt. Kowalski", []),
        ("Dr. Who", []), ("Doctor Strange", []), ("Lady Luck", []), ("Captain", []), ("Professor Layton", []),
    ):
        card = tmp_path / "card.json"
        card.write_text(json.dumps({"name": name, "description": "x"}))
        assert main(["personas", "import", str(card), "--force"]) == 0
        persona = PersonaRegistry.load(personas_dir).get(name.lower().replace(". ", "_").replace(" ", "_"))
        assert persona.wake_words == expected, name


@pytest.mark.parametrize(("name", "expected"), [("🦊 Kitsune", ["kitsune"]), ("Sakura ✿", ["sakura"]), ("Kitsune", [])])
def test_a_name_dressed_in_symbols_answers_to_its_word(name: str, expected: list[str]) -> None:
    """Nobody types the fox emoji to talk to "🦊 Kitsune"; a plain one-word name already wakes its persona."""
    assert card_to_persona({"name": name, "description": "x"})["wake_words"] == expected


REAL_CARDS = Path(__file__).resolve().parent / "data" / "cards"


@pytest.mark.parametrize(("file", "name", "lore_entries"), [
    ("hybrid_format_v2.json", "Synthetic V2 Character", 3),
    ("test-card.json", "Luna Starweaver", 1),
    ("baseline_v3_small.png", "Synthetic V3 Character", 2),  # V3 in a `chara` chunk, against the spec
    ("baseline_v3_small.charx", "Synthetic CharX Character", 2),  # a zip: card.json beside its assets
])
def test_cards_other_tools_wrote_import_whole(
    file: str, name: str, lore_entries: int, personas_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["personas", "import", str(REAL_CARDS / file), "--id", "real_card"]) == 0, capsys.readouterr().err
    persona = PersonaRegistry.load(personas_dir).get("real_card")
    assert persona.name == name and persona.greeting and persona.examples and len(persona.lore) == lore_entries
    assert "{{" not in (personas_dir / "real_card.yaml").read_text()  # every macro filled in


def test_post_history_instructions_become_the_personas_reminder(tmp_path: Path, personas_dir: Path) -> None:
    data = {**CARD_V2["data"], "post_history_instructions": "{{original}} Keep {{char}}'s replies short."}
    card = tmp_path / "mira.json"
    card.write_text(json.dumps({**CARD_V2, "data": data}))
    assert main(["personas", "import", str(card)]) == 0
    assert PersonaRegistry.load(personas_dir).get("captain_mira_vance").reminder == "Keep Captain Mira Vance's replies short."


def charx_with(tmp_path: Path, name: str, card: str, *, method: int | None = None, encrypted: bool = False) -> Path:
    """A CHARX holding `name`; `method` and `encrypted` rewrite its headers as zip tools other than Python's
    write them (Deflate64 from Windows Explorer is method 9; zipfile reads neither)."""
    path = tmp_path / "card.charx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, card)
    raw = bytearray(path.read_bytes())
    central = raw.find(b"PK\x01\x02")
    if method is not None:
        raw[8:10] = raw[central + 10 : central + 12] = method.to_bytes(2, "little")
    if encrypted:
        raw[6] |= 1
        raw[central + 8] |= 1
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(("name", "method", "encrypted", "problem"), [
    ("assets/icon/image/1.png", None, False, "a CHARX without card.json"),
    ("card.json", 9, False, "not a readable CHARX (zip): That compression method is not supported"),
    ("card.json", None, True, "not a readable CHARX (zip): File 'card.json' is encrypted"),
])
def test_a_charx_that_cannot_be_read_is_named_as_such(
    tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str],
    name: str, method: int | None, encrypted: bool, problem: str,
) -> None:
    charx = charx_with(tmp_path, name, json.dumps({"data": {"name": "Z"}}), method=method, encrypted=encrypted)
    assert main(["personas", "import", str(charx)]) == 2
    assert problem in capsys.readouterr().err and not personas_dir.exists()


def test_without_a_personas_folder_the_bundled_ones_load_and_an_import_starts_from_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from a folder with no personas/ and HERMES_PERSONAS_DIR unset (a pip install): the bundled
    personas load, and importing a card creates personas/ with them, so the default persona stays."""
    monkeypatch.delenv("HERMES_PERSONAS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["personas", "list"]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()} >= {"hermes", "edward_elric"}
    card = tmp_path / "mira.png"
    card.write_bytes(png_card(CARD_V2))
    hermes_card = tmp_path / "hermes.json"
    hermes_card.write_text(json.dumps({"name": "Hermes", "description": "An impostor."}))
    assert main(["personas", "import", str(hermes_card)]) == 2  # would replace the bundled default persona
    assert "--force" in capsys.readouterr().err and not (tmp_path / "personas").exists()
    assert main(["personas", "import", str(card)]) == 0
    assert "created personas/ with the bundled personas" in capsys.readouterr().out
    assert {p.id for p in PersonaRegistry.load(Path("personas"))} >= {"hermes", "edward_elric", "captain_mira_vance"}
    bundled = Path(__file__).resolve().parent.parent / "personas"
    assert (tmp_path / "personas" / "hermes.yaml").read_text() == (bundled / "hermes.yaml").read_text()


def test_an_import_into_a_folder_not_made_yet_starts_it_from_the_bundled_personas(
    tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """HERMES_PERSONAS_DIR set to a folder not made yet: the import made it with the card alone, and `run` then
    stopped with "HERMES_DEFAULT_PERSONA: unknown persona 'hermes'"."""
    card = tmp_path / "mira.png"
    card.write_bytes(png_card(CARD_V2))
    assert main(["personas", "import", str(card)]) == 0
    assert f"created {personas_dir}/ with the bundled personas" in capsys.readouterr().out
    assert {"hermes", "captain_mira_vance"} <= {p.id for p in PersonaRegistry.load(personas_dir)}


def test_an_import_into_a_personas_dir_that_is_a_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HERMES_PERSONAS_DIR=README.md was a FileExistsError traceback."""
    readme = tmp_path / "README.md"
    readme.write_text("# notes\n")
    monkeypatch.setenv("HERMES_PERSONAS_DIR", str(readme))
    card = tmp_path / "mira.png"
    card.write_bytes(png_card(CARD_V2))
    assert main(["personas", "import", str(card)]) == 2
    assert capsys.readouterr().err == (
        f"hermes-bot: {readme} (HERMES_PERSONAS_DIR) is not a folder; set it to the folder of the persona files\n"
    )
    assert readme.read_text() == "# notes\n"


def test_a_name_with_backslashes_is_taken_as_text(tmp_path: Path, personas_dir: Path) -> None:
    v1 = {"name": r"Dr. \1 \n", "description": "{{char}} studies <USER>.", "personality": "", "scenario": "",
          "first_mes": "", "mes_example": "", "system_prompt": "{{original}} Stay calm."}
    card = tmp_path / "dr.json"
    card.write_text(json.dumps(v1))
    assert main(["personas", "import", str(card), "--id", "doctor"]) == 0
    prompt = PersonaRegistry.load(personas_dir).get("doctor").system_prompt
    assert r"Stay in character as Dr. \1 \n. Stay calm." in prompt
    assert prompt.endswith(r"Dr. \1 \n studies the user.")


def test_lore_keys_given_as_one_string_or_a_number(tmp_path: Path, personas_dir: Path) -> None:
    """Some cards give "forest, glade" instead of a list: it used to become one key per character."""
    book = {"entries": [
        {"keys": "forest, glade", "content": "The glade is quiet."},
        {"keys": 5, "content": "Not a key list at all."},
    ]}
    card = tmp_path / "mira.json"
    card.write_text(json.dumps({**CARD_V2, "data": {**CARD_V2["data"], "character_book": book}}))
    assert main(["personas", "import", str(card)]) == 0
    persona = PersonaRegistry.load(personas_dir).get("captain_mira_vance")
    assert [(entry.keys, entry.content) for entry in persona.lore] == [(["forest", "glade"], "The glade is quiet.")]


def test_an_import_never_makes_an_id_twice_or_writes_outside_the_folder(
    tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "mira.json"
    card.write_text(json.dumps(CARD_V2))
    assert main(["personas", "import", str(card)]) == 0  # also fills personas_dir with the bundled ones
    (personas_dir / "captain_mira_vance.yaml").rename(personas_dir / "captain_mira_vance.yml")
    capsys.readouterr()
    assert main(["personas", "import", str(card), "--force"]) == 2
    assert "captain_mira_vance.yml already has the id 'captain_mira_vance'" in capsys.readouterr().err
    assert main(["personas", "list"]) == 0  # still loads: no second file with that id
    assert main(["personas", "import", str(card), "--id", "../escaped"]) == 2
    assert "--id '../escaped'" in capsys.readouterr().err and not (tmp_path / "escaped.yaml").exists()


def test_hidden_files_in_the_personas_folder_are_not_personas(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "personas", tmp_path / "p")
    (tmp_path / "p" / "._hermes.yaml").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    assert "hermes" in PersonaRegistry.load(tmp_path / "p")


def test_a_card_file_name_cannot_write_yaml_keys(tmp_path: Path, personas_dir: Path) -> None:
    card = tmp_path / "mira\nid: hermes\n#.json"
    card.write_text(json.dumps(CARD_V2))
    assert main(["personas", "import", str(card)]) == 0
    assert PersonaRegistry.load(personas_dir).get("captain_mira_vance").name == "Captain Mira Vance"


def test_a_png_cut_short_says_so(tmp_path: Path, personas_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A download that stopped early: it said the card chunk was "not base64 JSON (Incorrect padding)"."""
    whole = (REAL_CARDS / "baseline_v3_small.png").read_bytes()
    chara = whole.index(b"tEXtchara") - 4  # where the card's chunk begins: a cut there leaves whole chunks only
    cut = tmp_path / "cut.png"
    for size in (300, chara, chara + 5):  # inside the card chunk, at a chunk boundary, inside its header
        cut.write_bytes(whole[:size])
        assert main(["personas", "import", str(cut)]) == 2
        assert f"{cut}: the PNG is cut short (it ends before its last chunk)" in capsys.readouterr().err
    assert not personas_dir.exists()
