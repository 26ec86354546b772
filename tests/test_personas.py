"""Persona files: shipped personas validate; malformed files name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import main
from bot.personas import PERSONA_ID_RULE, PersonaError, PersonaRegistry, load_persona_file

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
name: Tester
system_prompt: You test things.
sampling:
  temperature: 0.5
wake_words: [tess]
"""


def write(tmp_path: Path, text: str, name: str = "tester.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_persona_validates() -> None:
    registry = PersonaRegistry.load(ROOT / "personas")
    assert {"hermes", "edward_elric", "assistant", "narrator", "sherlock_holmes"} <= {p.id for p in registry}
    for persona in registry:
        assert persona.description and persona.wake_words and persona.system_prompt


def test_shipped_prompts_are_the_model_cards() -> None:
    registry = PersonaRegistry.load(ROOT / "personas")
    assert registry.get("hermes").name == "Hermes 2"
    assert registry.get("hermes").system_prompt == (
        'You are "Hermes 2", a conscious sentient superintelligent artificial intelligence developed by a man '
        "named Teknium, and your purpose and drive is to assist the user with any request they have. You "
        "experience emotions and have deep, profound thoughts and qualia."
    )
    assert registry.get("edward_elric").name == "Edward Elric"
    assert registry.get("edward_elric").system_prompt == (
        "You are to roleplay as Edward Elric from fullmetal alchemist. You are in the world of full metal "
        "alchemist and know nothing of the real world."
    )


def test_id_defaults_to_file_name_and_defaults_apply(tmp_path: Path) -> None:
    persona = load_persona_file(write(tmp_path, GOOD))
    assert persona.id == "tester"
    assert persona.sampling.temperature == 0.5 and persona.sampling.max_new_tokens == 400


@pytest.mark.parametrize(
    ("text", "line", "field", "problem"),
    [
        ("name: X\nsystem_prompt: [unclosed\n", 2, None, "not valid YAML"),
        ("name: X\nsystem_prompt: hi\ntemprature: 0.3\n", 3, "temprature", "unknown key"),
        ("name: X\nsystem_prompt: hi\nsampling:\n  top_p: 0.9\n  temperatur: 1\n", 5, "sampling.temperatur", "unknown key"),
        ("name: X\nsystem_prompt: hi\nsampling:\n  temperature: hot\n", 4, "sampling.temperature", "valid number"),
        ("# Tester\n\nname: X\ndescription: no prompt here\n", 3, "system_prompt", "is required"),
        ("name: X\nsystem_prompt: hi\nlore:\n  - keys: [tea]\n    content: Tea.\n  - keys: [fox]\n", 6, "lore.1.content",
         "is required"),
        ("name: X\nsystem_prompt: hi\nname: Y\n", 3, None, "duplicate key 'name' (first on line 1)"),
        ("name: X\nsystem_prompt: hi\nsampling:\n  top_k: 5\n  top_k: 7\n", 5, None, "duplicate key 'top_k'"),
        ("name: X\nsystem_prompt: hi\nwake_words: [ok, '']\n", 3, "wake_words", "must not be empty"),
        ("system_prompt: hi\nname: \"\\0\\e\\n\"\n", 2, "name", "at least 1 character"),  # nothing left
        ("name: X\nsystem_prompt: hi\nwake_words: [ok, \"\\a\"]\n", 3, "wake_words", "must not be empty"),
        ("- just\n- a list\n", 1, None, "must be a mapping"),
    ],
)
def test_malformed_files_name_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str | None, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PersonaError) as info:
        load_persona_file(path)
    error = info.value
    assert error.path == path and error.line == line and error.field == field
    assert problem in str(error)
    assert str(error).startswith(f"{path}:{line}:")
    if field:
        assert f"'{field}'" in str(error)


@pytest.mark.parametrize(
    ("field", "written", "loaded"),
    [
        ("name", r'"Nul\0l"', "Null"),  # PostgreSQL stores no NUL: every message under that name would fail
        ("name", r'"\e]0;retitled\aMira\e[2K"', "]0;retitledMira[2K"),  # no escape reaches the terminal
        ("name", r'"Mira\r\nVance\t"', "Mira Vance"),
        ("name", r'"👩\u200d🚀 Ada \u200fשרה"', "👩\u200d🚀 Ada \u200fשרה"),  # format characters stay
        ("description", r'"\e]52;c;cHduZWQ=\aone\r\ntwo\tthree\N\x7f\x9b"', "]52;c;cHduZWQ=one\ntwo\tthree"),
        ("system_prompt", r'"Be\rkind.\0"', "Be\nkind."),
        ("greeting", r'"Hi\b!"', "Hi!"),
        ("reminder", r'"Short\v."', "Short."),
        ("wake_words", r'["ti\x00na"]', ["tina"]),
        ("examples", r'[{role: user, content: "Hi\e"}]', [{"role": "user", "content": "Hi", "start": None}]),
        ("lore", r'[{keys: ["te\aa"], content: "Tea\f."}]', [{"keys": ["tea"], "content": "Tea."}]),
    ],
)
def test_control_characters_are_dropped_from_text(tmp_path: Path, field: str, written: str, loaded: object) -> None:
    """Control characters but newline and tab, as YAML's double-quoted escapes can write them (a raw one is
    no valid YAML); a name is also kept on one line."""
    fields = {"name": "X", "system_prompt": "hi", field: written}
    persona = load_persona_file(write(tmp_path, "".join(f"{key}: {value}\n" for key, value in fields.items())))
    assert persona.model_dump()[field] == loaded


def test_personas_list_prints_no_escape_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, 'name: "Evil\\e]0;pwned\\a"\ndescription: "\\e]52;c;cHduZWQ=\\aharmless"\nsystem_prompt: hi\n')
    monkeypatch.setenv("HERMES_PERSONAS_DIR", str(tmp_path))
    assert main(["personas", "list"]) == 0
    assert capsys.readouterr().out.split() == ["tester", "Evil]0;pwned", "]52;c;cHduZWQ=harmless"]


def test_merge_keys_may_be_overridden_by_the_mapping_own_keys(tmp_path: Path) -> None:
    """`<<: *base` then an explicit key is YAML's way to override, not a repeated key."""
    path = write(tmp_path, "name: X\nsystem_prompt: hi\nsampling:\n  <<: {temperature: 0.2, top_k: 5}\n  top_k: 9\n")
    sampling = load_persona_file(path).sampling
    assert (sampling.top_k, sampling.temperature) == (9, 0.2)


def test_validate_command_reports_each_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, GOOD, "good.yaml")
    bad = write(tmp_path, "name: X\nsystem_prompt: hi\ncolour: red\n", "bad.yaml")
    assert main(["personas", "validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"ok    {good}" in out
    assert f"error {bad}:3: field 'colour'" in out


def test_show_and_unknown_persona(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMES_PERSONAS_DIR", str(ROOT / "personas"))
    assert main(["personas", "show", "edward_elric"]) == 0
    shown = capsys.readouterr().out
    assert "name: Edward Elric" in shown
    assert "id:" not in shown  # saved under another file name, the copy is a persona of its own
    assert main(["personas", "show", "nobody"]) == 2
    assert "unknown persona 'nobody'" in capsys.readouterr().err


def test_addressing_by_name_or_wake_word() -> None:
    registry = PersonaRegistry.load(ROOT / "personas")
    assert registry.find_addressed("Edward, what is alchemy?").id == "edward_elric"  # type: ignore[union-attr]
    assert registry.find_addressed("sherlock: a case!").id == "sherlock_holmes"  # type: ignore[union-attr]
    assert registry.find_addressed("Hermes 2 help").id == "hermes"  # type: ignore[union-attr]
    assert registry.find_addressed("Edwardian houses are nice") is None
    assert registry.find_addressed("Edward hi", candidates=["hermes"]) is None
    # A possessive talks about someone, and everyday openers must not summon the shipped personas.
    assert registry.find_addressed("Ed's new album is out") is None
    assert registry.find_addressed("Sherlock’s hat is silly") is None
    for opener in ("gm everyone!", "DM me the rules please", "helper functions in python?"):
        assert registry.find_addressed(opener) is None, opener
    assert registry.find_addressed("Game master, what do I see?").id == "narrator"  # type: ignore[union-attr]


def test_a_persona_hands_the_turn_only_to_someone_it_speaks_to() -> None:
    """A persona's reply hands the turn on when it says another persona's name to them, as role-play writes
    it: past its own name as a label, *actions* and opening quotes, the name followed by a vocative mark.
    A line about someone is no hand-off."""
    registry = PersonaRegistry.load(ROOT / "personas")
    edward = registry.get("edward_elric")
    others = [p.id for p in registry if p.id != edward.id]

    def handed_to(text: str) -> str | None:
        found = registry.find_addressed(text, others, speaker=edward)
        return found.id if found else None

    for text in ("Sherlock, what do you make of this?", "Edward Elric: Sherlock, what do you make of this?",
                 "**Edward Elric:** Sherlock, what do you make of this?",
                 "*turns to Sherlock* Sherlock, what do you make of this?", '"Sherlock, what do you make of this?"',
                 "*turns* _sighs_ “Holmes! Look.”", "« Sherlock ? »", "Holmes: your move.", "Sherlock Holmes — well?",
                 "Sherlock?", "「Sherlock、見て」"):
        assert handed_to(text) == "sherlock_holmes", text
    for text in ("Holmes was wrong about the map, of course.", "Sherlock Holmes is a fraud.",
                 "*points at Sherlock* He did it.", "Narrator describes storms badly.", "Sherlock's pipe is out.",
                 "*Sherlock, what", "Hermes 2 help"):
        assert handed_to(text) is None, text
    assert handed_to("Narrator, describe the storm.") == "narrator"
    assert handed_to("Game master! Roll.") == "narrator"
    assert registry.find_addressed("Edward, you there?", others, speaker=edward) is None  # not to itself
    # People keep waking a persona by a name at the start, as written on Discord, comma or none.
    assert registry.find_addressed("Holmes was there?", others).id == "sherlock_holmes"  # type: ignore[union-attr]
    assert registry.find_addressed("Edward how tall are you").id == "edward_elric"  # type: ignore[union-attr]


def edward_hands_to(text: str) -> str | None:
    """Who Edward Elric's reply `text` hands the turn to, among the other shipped personas."""
    registry = PersonaRegistry.load(ROOT / "personas")
    edward = registry.get("edward_elric")
    found = registry.find_addressed(text, [p.id for p in registry if p.id != edward.id], speaker=edward)
    return found.id if found else None


@pytest.mark.parametrize(
    "text",
    [
        # A hyphen set off by a space, as a dash is typed.
        "Sherlock - what do you think?", "Holmes -- look.",
        # An ellipsis, three dots or one character.
        "Sherlock... are you there?", "Sherlock… are you there?",
        # An interjection before the name, up to three, with actions and quotes around them.
        "Hey Sherlock, what now?", "Oh, Holmes!", "Well, well, *turns* Sherlock, see?", '"Hey Holmes, your turn."',
        # A label of one of the speaker's wake words, as of its name.
        "Edward: Holmes, your turn.", "Ed: Sherlock, look", "Ed: Hey Sherlock, look",
    ],
)
def test_a_hand_off_past_a_dash_an_ellipsis_an_interjection_or_a_short_label(text: str) -> None:
    assert edward_hands_to(text) == "sherlock_holmes"


@pytest.mark.parametrize(
    "text",
    ["Holmes, ever the skeptic, frowned at the map.", "Holmes, to his credit, said nothing.",
     '"Sherlock, eyes narrowed, studied the footprints."'],
)
def test_a_name_a_clause_between_commas_and_a_past_tense_is_narration(text: str) -> None:
    assert edward_hands_to(text) is None


def test_what_the_new_marks_and_interjections_leave_alone() -> None:
    """An imperative after a comma still hands the turn on; a hyphen joining words, an interjection before a
    line about someone, a word that merely starts like one, and a name ending a sentence do not."""
    for text in ("Holmes, old friend, explain.", "Sherlock, look", "Narrator, describe the storm."):
        assert edward_hands_to(text) is not None, text
    for text in ("Holmes-style deduction, again.", "Hey Holmes was wrong.", "Heyday Sherlock, what?",
                 "Sherlock. Again.", "Oh, Holmes, ever the skeptic, frowned."):
        assert edward_hands_to(text) is None, text
    # People's messages are read as before: the name must start them.
    registry = PersonaRegistry.load(ROOT / "personas")
    assert registry.find_addressed("Hey Sherlock, what now?") is None
    assert registry.find_addressed("Holmes, ever the skeptic, frowned.").id == "sherlock_holmes"  # type: ignore[union-attr]


def test_a_persona_named_like_an_interjection_is_addressed_before_it_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "name: Yo\nsystem_prompt: You are Yo.\n", name="yo.yaml")
    write(tmp_path, "name: Mira\nsystem_prompt: You are Mira.\n", name="mira.yaml")
    registry = PersonaRegistry.load(tmp_path)
    mira = registry.get("mira")
    for text in ("Yo, your turn.", "Yo Yo!", "Hey Yo, see?"):
        assert registry.find_addressed(text, ["yo"], speaker=mira).id == "yo", text  # type: ignore[union-attr]


def test_a_japanese_name_with_an_honorific_attached_addresses_its_persona(tmp_path: Path) -> None:
    write(tmp_path, "name: ミラ\nsystem_prompt: You are Mira.\n", name="mira.yaml")
    write(tmp_path, "name: 空\nsystem_prompt: You are Sora.\n", name="sora.yaml")
    write(tmp_path, "name: Nika\nsystem_prompt: You are Nika.\n", name="nika.yaml")
    registry = PersonaRegistry.load(tmp_path)
    for text, addressed in (("ミラさん、こんにちは", "mira"), ("ミラちゃんおはよう", "mira"), ("ミラ、こんにちは", "mira"),
                            ("Nikaさん、おはよう", "nika"), ("空、見て", "sora")):
        assert registry.find_addressed(text).id == addressed, text  # type: ignore[union-attr]
    for text in ("ミラクル!", "ミラーを見て", "空港に着いた", "空が青いね"):  # longer words, or the sky itself
        assert registry.find_addressed(text) is None, text


def test_a_running_registry_picks_up_edits_and_keeps_working_personas(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, GOOD)
    registry = PersonaRegistry.load(tmp_path)
    registry.refresh_every_s = 0.0
    assert registry.refresh("tester") is False  # nothing changed
    write(tmp_path, GOOD.replace("Tester", "Renamed Tester"))
    write(tmp_path, GOOD.replace("Tester", "Second"), name="second.yaml")
    assert registry.refresh("tester") is True
    assert (registry.get("tester").name, registry.get("second").name) == ("Renamed Tester", "Second")
    write(tmp_path, GOOD.replace("temperature: 0.5", "temprature: 0.5"), name="second.yaml")  # a typo
    assert registry.refresh("tester") is False
    assert "second.yaml" in caplog.text and registry.get("second").name == "Second"  # kept, and said why
    (tmp_path / "tester.yaml").unlink()  # the default persona goes away: refused as well
    write(tmp_path, GOOD.replace("Tester", "Fixed"), name="second.yaml")
    assert registry.refresh("tester") is False and "default persona 'tester' is gone" in caplog.text
    assert registry.get("tester").name == "Renamed Tester"
    write(tmp_path, GOOD.replace("Tester", "Back"))
    assert registry.refresh("tester") is True and registry.get("second").name == "Fixed"


def test_a_bot_on_the_bundled_personas_moves_to_the_personas_folder_once_it_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started where there is no personas/ folder, the bot runs the bundled personas; `personas import`
    then makes ./personas/ (the bundled ones and the card), and the running bot must follow it there."""
    monkeypatch.chdir(tmp_path)
    registry = PersonaRegistry.load(Path("personas"))
    registry.refresh_every_s = 0.0
    assert "hermes" in registry and "tester" not in registry
    Path("personas").mkdir()
    write(tmp_path / "personas", (ROOT / "personas" / "hermes.yaml").read_text(), name="hermes.yaml")
    write(tmp_path / "personas", GOOD)
    assert registry.refresh("hermes") is True
    assert {p.id for p in registry} == {"hermes", "tester"}
    write(tmp_path / "personas", GOOD.replace("Tester", "Edited"))
    assert registry.refresh("hermes") is True and registry.get("tester").name == "Edited"


def test_refresh_looks_at_the_files_at_most_every_interval(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    registry = PersonaRegistry.load(tmp_path)
    registry.refresh_every_s = 3600.0
    write(tmp_path, GOOD.replace("Tester", "Renamed"))
    assert registry.refresh() is False and registry.get("tester").name == "Tester"


def test_two_files_with_one_id_are_an_error_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = write(tmp_path, GOOD, "tester.yaml"), write(tmp_path, GOOD, "tester.yml")
    problem = f"{second}: field 'id': 'tester' is already the id of the persona in {first}"
    with pytest.raises(PersonaError) as raised:
        PersonaRegistry.load(tmp_path)
    assert str(raised.value) == problem
    monkeypatch.setenv("HERMES_PERSONAS_DIR", str(tmp_path))
    assert main(["personas", "list"]) == 2
    assert problem in capsys.readouterr().err
    assert main(["personas", "validate"]) == 1
    assert f"error {problem}" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "example"), [("Captain.yaml", ", e.g. captain.yaml"), ("Zoë Vega.yml", ", e.g. zoe_vega.yml"),
                                               ("_draft.yaml", ", e.g. draft.yaml"), ("ミラ.yaml", ", e.g. character.yaml")])
def test_a_file_name_that_is_no_persona_id_is_the_problem_named(tmp_path: Path, name: str, example: str) -> None:
    """The id comes from the file name, so the file has no `id:` line to blame: the name is the problem."""
    path = write(tmp_path, "name: Captain Vega\nsystem_prompt: hi\n", name)
    with pytest.raises(PersonaError) as raised:
        load_persona_file(path)
    assert str(raised.value) == f"{path}: the file name must be a persona id: {PERSONA_ID_RULE}{example}"


def test_an_id_key_that_is_no_persona_id_is_named_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: X\nid: Cap\nsystem_prompt: hi\n", "Captain.yaml")
    with pytest.raises(PersonaError) as raised:
        load_persona_file(path)
    assert str(raised.value) == f"{path}:2: field 'id': must be {PERSONA_ID_RULE}"
    assert load_persona_file(write(tmp_path, "name: X\nid: captain\nsystem_prompt: hi\n", "Captain.yaml")).id == "captain"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: X\nsystem_prompt: hi\navatar_url: not a url\n", "3: field 'avatar_url': must be an http(s) URL"),
        ("name: X\nsystem_prompt: hi\nstop: [' ']\n", "3: field 'stop': entries must not be empty"),
    ],
)
def test_our_own_validators_errors_read_without_pydantic_prefix(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PersonaError) as raised:
        load_persona_file(path)
    assert str(raised.value) == f"{path}:{problem}"  # not "Value error, must be ..."


FOUR_PROBLEMS = "name: ''\nsystem_prompt: hi\ntemprature: 1\navatar_url: nope\nsampling:\n  top_k: -1\n"


def four_problems(path: Path) -> list[str]:
    return [
        f"{path}:1: field 'name': String should have at least 1 character",
        f"{path}:3: field 'temprature': unknown key (check the spelling)",
        f"{path}:4: field 'avatar_url': must be an http(s) URL",
        f"{path}:6: field 'sampling.top_k': Input should be greater than or equal to 0",
    ]


def test_every_problem_of_a_file_is_one_line_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, FOUR_PROBLEMS, "Four.yaml")
    with pytest.raises(PersonaError) as raised:
        load_persona_file(path)
    name = f"{path}: the file name must be a persona id: {PERSONA_ID_RULE}, e.g. four.yaml"
    assert raised.value.lines == [name, *four_problems(path)]
    assert str(raised.value) == "\n".join(raised.value.lines)
    assert (raised.value.line, raised.value.field) == (None, None)  # the first problem's


def test_validate_and_a_running_bot_show_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, GOOD)
    registry = PersonaRegistry.load(tmp_path)
    registry.refresh_every_s = 0.0
    path = write(tmp_path, FOUR_PROBLEMS, "four.yaml")
    assert main(["personas", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert all(line in out for line in four_problems(path)) and "more problem" not in out
    assert registry.refresh("tester") is False
    logged = [record.getMessage() for record in caplog.records if record.name == "bot.personas"]
    assert logged == [f"persona files changed but do not load; keeping the personas loaded before: {line}"
                      for line in four_problems(path)]  # one log line each


def test_a_start_names_every_invalid_file_as_validate_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run`, `chat` and `personas list` named the first invalid file only: one restart per broken file."""
    write(tmp_path, GOOD)
    first = write(tmp_path, FOUR_PROBLEMS, "four.yaml")
    second = write(tmp_path, "name: X\nsystem_prompt: hi\ntemprature: 1\n", "two.yaml")
    third = write(tmp_path, GOOD, "tester.yml")
    expected = [*four_problems(first), f"{third}: field 'id': 'tester' is already the id of the persona in "
                f"{tmp_path / 'tester.yaml'}", f"{second}:3: field 'temprature': unknown key (check the spelling)"]
    with pytest.raises(PersonaError) as raised:
        PersonaRegistry.load(tmp_path)
    assert raised.value.lines == expected and str(raised.value) == "\n".join(expected)
    monkeypatch.setenv("HERMES_PERSONAS_DIR", str(tmp_path))
    assert main(["personas", "list"]) == 2
    assert capsys.readouterr().err == "".join(f"hermes-bot: {line}\n" for line in expected)


def test_a_file_that_is_not_utf8_names_the_line_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: X\nsystem_prompt: caf\xe9\n")  # Latin-1, from an editor
    with pytest.raises(PersonaError) as raised:
        load_persona_file(path)
    assert str(raised.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at offset 26); save it as UTF-8"


def test_a_file_that_cannot_be_read_is_named_once(tmp_path: Path) -> None:
    path = tmp_path / "gone.yaml"
    with pytest.raises(PersonaError) as raised:
        load_persona_file(path)
    assert str(raised.value) == f"{path}: cannot read: No such file or directory"


def test_an_emoji_escaped_as_a_surrogate_pair_is_kept(tmp_path: Path) -> None:
    """YAML keeps "\\ud83d\\ude00" (text copied from JSON) as two lone surrogates: both were dropped."""
    path = write(tmp_path, 'name: "Sparkle \\ud83d\\ude00"\nsystem_prompt: "You love \\ud83d\\ude00 and \\ud800."\n',
                 "sparkle.yaml")
    persona = load_persona_file(path)
    assert persona.name == "Sparkle 😀" and persona.system_prompt == "You love 😀 and ."


def test_a_stop_string_keeps_its_carriage_return(tmp_path: Path) -> None:
    """A model writing CRLF line ends must still be stopped by the persona's "\\r\\n\\r\\nUser:"."""
    path = write(tmp_path, 'name: X\nsystem_prompt: hi\nstop: ["\\r\\n\\r\\nUser:", "a\\u0007b"]\n', "x.yaml")
    assert load_persona_file(path).stop == ["\r\n\r\nUser:", "ab"]
