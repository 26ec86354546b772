"""Personas: the YAML schema, loading with file/line/field errors, and the registry.

A persona file is strict: unknown keys are errors, so a typo such as `temprature:` fails loudly
instead of silently using the default.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails

from bot.config import DEFAULT_PERSONAS_DIR, not_utf8
from bot.strict_yaml import StrictLoader, where_and_what

PERSONA_SUFFIXES = (".yaml", ".yml")
PERSONA_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # also a safe file name
PERSONA_ID_RULE = "lowercase letters, digits, _ and - (up to 64 characters, the first a letter or digit)"
REFRESH_EVERY_S = 2.0  # how often a running bot looks for edited persona files

log = logging.getLogger(__name__)


class Sampling(BaseModel):
    """Per-persona sampling settings, sent with every generation job."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.1, gt=0.0, le=3.0)
    max_new_tokens: int = Field(400, ge=1, le=8192)


# Control characters (Unicode Cc) other than tab, newline and carriage return: a NUL cannot be stored in
# PostgreSQL text, and escape sequences printed by `personas list` would drive the operator's terminal (title,
# clipboard). Lone surrogates (a card's JSON may escape one, "\ud800") cannot be written as UTF-8 at all.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
SURROGATES = re.compile("[\ud800-\udfff]")
LINE_BREAKS = re.compile("[\n\t\u2028\u2029]")


def without_controls(text: str) -> str:
    """`text` without control characters (tab, newline and carriage return stay) or lone surrogates. An emoji
    written as a surrogate pair ("\ud83d\ude00", as JSON escapes it and YAML keeps it) is joined, not lost."""
    if SURROGATES.search(text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return CONTROL_CHARS.sub("", text)


def plain_text(text: str) -> str:
    r"""`without_controls`, and `\r\n` and a lone `\r` become `\n`. Format characters (Cf) stay: the zero-width
    joiner inside an emoji sequence, the direction marks of a right-to-left name."""
    return without_controls(text.replace("\r\n", "\n").replace("\r", "\n"))


def one_line(text: str) -> str:
    """`plain_text` on one line, its ends stripped: a name is printed in lists and matched at the start of
    messages, where a line break or tab would split it."""
    return LINE_BREAKS.sub(" ", plain_text(text)).strip()


def _cleaned(clean: Callable[[str], str]) -> BeforeValidator:
    return BeforeValidator(lambda value: clean(value) if isinstance(value, str) else value)


# Cleaned before the length checks, so a value of control characters only is an empty one. A stop string keeps
# its "\r": a model that writes CRLF line ends must still match "\r\nUser:".
Text = Annotated[str, _cleaned(plain_text)]
OneLine = Annotated[str, _cleaned(one_line)]
StopText = Annotated[str, _cleaned(without_controls)]


class ExampleTurn(BaseModel):
    """One line of example dialogue shown to the model before the real conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: Text = Field(min_length=1)
    # This line starts another example chat (a card's `<START>`): the prompt marks it off from the one before.
    start: bool | None = None


def _without_blank_entries(value: list[str]) -> list[str]:
    if any(not item.strip() for item in value):
        raise ValueError("entries must not be empty")
    return value


NonBlankStrings = Annotated[list[Text], AfterValidator(_without_blank_entries)]
StopStrings = Annotated[list[StopText], AfterValidator(_without_blank_entries)]

# Scripts that run words together (Chinese, Japanese, Thai) or attach particles to them (Korean): a lore key
# written in them has no word boundary around it in a sentence.
UNSPACED_SCRIPTS = re.compile("[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def _unspaced(char: str) -> bool:
    return UNSPACED_SCRIPTS.match(char) is not None


# Said right after a name, written as one word with it: Japanese さん, ちゃん, くん, 様, 先生, ...; Korean 님, 씨.
HONORIFICS = ("さん", "ちゃん", "くん", "君", "様", "さま", "殿", "氏", "先生", "님", "씨")


class LoreEntry(BaseModel):
    """Background the persona is told only while the conversation mentions it (SillyTavern's world
    info): a long setting costs prompt tokens only when it matters."""

    model_config = ConfigDict(extra="forbid")

    keys: NonBlankStrings = Field(min_length=1)
    content: Text = Field(min_length=1)

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """Any key as a whole word, in any case; compiled once per entry, not on every reply. Where a key
        ends in a script written without spaces (東京に行きたい), that end needs no word boundary."""
        words = []
        for key in (key.strip() for key in self.keys):
            before = "" if _unspaced(key[0]) else r"(?<!\w)"
            after = "" if _unspaced(key[-1]) else r"(?!\w)"
            words.append(f"{before}{re.escape(key)}{after}")
        return re.compile("|".join(words), re.IGNORECASE)


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=PERSONA_ID_PATTERN)
    name: OneLine = Field(min_length=1, max_length=80)
    description: Text = ""
    avatar_url: OneLine | None = None
    system_prompt: Text = Field(min_length=1)
    greeting: Text | None = None
    examples: list[ExampleTurn] = Field(default_factory=list)
    sampling: Sampling = Field(default_factory=Sampling)
    stop: StopStrings = Field(default_factory=list)
    wake_words: NonBlankStrings = Field(default_factory=list)
    lore: list[LoreEntry] = Field(default_factory=list)
    # Read right before the newest turn of every reply (SillyTavern's post-history instructions): rules
    # that a long history must not drown out, such as the reply's length or format.
    reminder: Text | None = None

    @field_validator("avatar_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value

    def addressed_by(self) -> list[str]:
        """Words that address this persona at the start of a message: its name and wake words."""
        return [self.name, *self.wake_words]


Problem = tuple[int | None, str | None, str]  # line, field, what is wrong with it


def _problem_line(path: Path, line: int | None, field: str | None, problem: str) -> str:
    where = f"{path}:{line}:" if line else f"{path}:"
    what = f" field '{field}':" if field else ""
    return f"{where}{what} {problem}"


class PersonaError(ValueError):
    """A persona file is invalid: one message line per problem, each naming the file, the line and the field,
    so one run shows everything to fix. `line`, `field` and `problem` are the first problem's."""

    def __init__(
        self, path: Path, line: int | None, field: str | None, problem: str, *, more: Sequence[Problem] = ()
    ) -> None:
        self.lines = [_problem_line(path, *each) for each in ((line, field, problem), *more)]
        super().__init__("\n".join(self.lines))
        self.path, self.line, self.field, self.problem = path, line, field, problem

    def followed_by(self, others: Sequence[PersonaError]) -> PersonaError:
        """This error with the lines of `others` (other files) after its own."""
        self.lines = [*self.lines, *(line for other in others for line in other.lines)]
        self.args = ("\n".join(self.lines),)
        return self


class UnknownPersona(KeyError):
    """No persona has this id; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])


def _node_for(root: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """Walk a composed YAML node tree along a pydantic error location; the deepest node found (for a
    missing key, the mapping that lacks it)."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                return node
            # Unknown keys are reported at the key itself, others at their value.
            node = match[1] if part != loc[-1] else match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def persona_id_for(name: str, fallback: str = "") -> str:
    """A persona id from a character name: lowercase letters, digits and underscores, accents dropped
    ("Zoë" is `zoe`). A name with no Latin letters at all ("ミラ") takes its id from `fallback` (the card's
    file name), so two such cards do not both become `character`."""
    for text in (name, fallback):
        ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        if slug := re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:64].rstrip("_"):
            return slug
    return "character"


def _problem(root: yaml.Node | None, error: ErrorDetails, path: Path, id_from_file_name: bool) -> Problem:
    """One pydantic error as a line, field and problem. An id taken from the file name is the file name's
    problem: the file has no `id:` to point at."""
    loc = tuple(error["loc"])
    if loc == ("id",) and id_from_file_name:
        example = f"{persona_id_for(path.stem)}{path.suffix}"
        return None, None, f"the file name must be a persona id: {PERSONA_ID_RULE}, e.g. {example}"
    node = _node_for(root, loc)
    line = node.start_mark.line + 1 if node is not None else None
    field = ".".join(str(p) for p in loc) or None
    if error["type"] == "extra_forbidden":
        return line, field, "unknown key (check the spelling)"
    if error["type"] == "missing":
        return line, field, "is required"
    if loc == ("id",) and error["type"] == "string_pattern_mismatch":
        return line, field, f"must be {PERSONA_ID_RULE}"
    return line, field, error["msg"].removeprefix("Value error, ")  # the wording of our own validators' errors


def parse_persona(text: str, path: Path) -> Persona:
    """Parse one persona document; the id defaults to the file's stem. Every problem is reported, in file
    order, so fixing a file takes one run instead of one per problem."""
    try:  # one parse: the node tree gives error lines, the same tree gives the data
        loader = StrictLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        line, problem = where_and_what(exc, text)
        raise PersonaError(path, line, None, f"not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise PersonaError(path, 1, None, "must be a mapping of persona fields (name, system_prompt, ...)")
    id_from_file_name = "id" not in data
    data.setdefault("id", path.stem)
    try:
        return Persona.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(root, error, path, id_from_file_name) for error in exc.errors()]
        problems.sort(key=lambda problem: problem[0] or 0)  # the file name's problem, then by line
        raise PersonaError(path, *problems[0], more=problems[1:]) from None


def load_persona_file(path: Path) -> Persona:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PersonaError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line, problem = not_utf8(exc)
        raise PersonaError(path, line, None, problem) from None
    return parse_persona(text, path)


def claim_id(seen: dict[str, Path], persona: Persona, path: Path) -> None:
    """Record that `path` defines `persona`'s id; a second file with the same id is an error naming both
    (`foo.yaml` next to `foo.yml`, or a copied file whose id was not changed)."""
    first = seen.setdefault(persona.id, path)
    if first != path:
        raise PersonaError(path, None, "id", f"{persona.id!r} is already the id of the persona in {first}")


def load_persona_files(paths: Iterable[Path]) -> list[Persona]:
    """The persona of each file. Invalid files raise one PersonaError with every file's problems, as `personas
    validate` lists them: a start that named the first only took one restart per broken file."""
    seen: dict[str, Path] = {}
    personas, errors = [], []
    for path in paths:
        try:
            persona = load_persona_file(path)
            claim_id(seen, persona, path)
        except PersonaError as exc:
            errors.append(exc)
            continue
        personas.append(persona)
    if errors:
        raise errors[0].followed_by(errors[1:])
    return personas


def _by_id(personas: Iterable[Persona]) -> dict[str, Persona]:
    found: dict[str, Persona] = {}
    for persona in personas:
        if persona.id in found:
            raise ValueError(f"duplicate persona id {persona.id!r}")
        found[persona.id] = persona
    return found


def _file_state(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, modification time and size of each persona file: what changes when one is edited."""
    try:
        stats = [(path.name, path.stat()) for path in persona_files([directory])]
        return tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats)
    except OSError:  # the directory (or a file) vanished between listing and stat
        return ()


def persona_files(paths: Iterable[Path]) -> list[Path]:
    """Expand directories to their persona files, sorted, keep files as given."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            # Hidden files are not personas: macOS's ._name.yaml, an editor's .#name.yaml lock.
            found.extend(sorted(p for p in path.iterdir() if p.suffix in PERSONA_SUFFIXES and not p.name.startswith(".")))
        else:
            found.append(path)
    return found


def bundled_personas_dir() -> Path | None:
    """The personas shipped with hermes-bot: in an installed wheel (bot/bundled_personas), or the
    checkout's personas/ beside the package (an editable install run from another folder)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "bundled_personas", package.parent / DEFAULT_PERSONAS_DIR):
        if candidate.is_dir():
            return candidate
    return None


def personas_directory(configured: Path) -> Path:
    """Where personas load from: `configured`, or the bundled personas when it is the default
    `personas` and no such folder exists where the bot runs (a `pip install` started anywhere)."""
    if configured == DEFAULT_PERSONAS_DIR and not configured.is_dir():
        return bundled_personas_dir() or configured
    return configured


class PersonaRegistry:
    """The personas loaded from one directory, by id. An invalid file fails the load (every one is named).

    Loaded from a directory, it can `refresh()`: a running bot picks up edited, added and removed
    persona files without a restart.
    """

    def __init__(
        self, personas: Iterable[Persona], *, directory: Path | None = None, configured: Path | None = None
    ) -> None:
        self._by_id = _by_id(personas)
        self._directory = directory
        # The HERMES_PERSONAS_DIR setting the directory came from: a bot that started on the bundled
        # personas moves to ./personas/ once it appears (`personas import` makes it).
        self._configured = configured or directory
        self._files = _file_state(directory) if directory is not None else ()
        self._checked = time.monotonic()
        self.refresh_every_s = REFRESH_EVERY_S

    @classmethod
    def load(cls, directory: Path) -> PersonaRegistry:
        source = personas_directory(directory)
        if not source.is_dir():
            raise PersonaError(directory, None, None, "personas directory not found (set HERMES_PERSONAS_DIR)")
        if source != directory:
            log.info("no %s/ folder here: using the bundled personas in %s", directory, source)
        return cls(load_persona_files(persona_files([source])), directory=source, configured=directory)

    def refresh(self, required: str | None = None) -> bool:
        """Reload when the directory's files changed (looked at most every `refresh_every_s`); True
        when it did. An edit that does not load, or that drops the `required` persona, is logged once
        and the personas loaded before stay, so a typo never takes the bot down."""
        now = time.monotonic()
        if self._configured is None or now - self._checked < self.refresh_every_s:
            return False
        self._checked = now
        directory = personas_directory(self._configured)
        files = _file_state(directory)
        if directory == self._directory and files == self._files:
            return False
        self._directory, self._files = directory, files
        try:
            fresh = _by_id(load_persona_files(persona_files([directory])))
            if required is not None and required not in fresh:
                raise UnknownPersona(f"the default persona {required!r} is gone")
        except (PersonaError, UnknownPersona, ValueError, OSError) as exc:
            for problem in exc.lines if isinstance(exc, PersonaError) else [str(exc)]:  # one log line each
                log.warning("persona files changed but do not load; keeping the personas loaded before: %s", problem)
            return False
        self._by_id = fresh
        log.info("personas reloaded from %s: %s", directory, ", ".join(sorted(fresh)))
        return True

    def get(self, persona_id: str, *, named_by: str | None = None) -> Persona:
        """The persona; UnknownPersona lists the known ones, after `named_by`, where the id came from
        (HERMES_DEFAULT_PERSONA, --persona), when that is a setting or an option to fix."""
        try:
            return self._by_id[persona_id]
        except KeyError:
            known = ", ".join(sorted(self._by_id)) or "none"
            where = f"{named_by}: " if named_by else ""
            raise UnknownPersona(f"{where}unknown persona {persona_id!r} (known: {known})") from None

    def __contains__(self, persona_id: object) -> bool:
        return persona_id in self._by_id

    def __iter__(self) -> Iterator[Persona]:
        return iter(sorted(self._by_id.values(), key=lambda p: p.id))

    def __len__(self) -> int:
        return len(self._by_id)

    def find_addressed(
        self, text: str, candidates: Iterable[str] | None = None, *, speaker: Persona | None = None
    ) -> Persona | None:
        """The persona whose name or wake word starts `text` ("Edward, ..."), among `candidates`.

        A person's message (no `speaker`) addresses a persona that its first word names, as people write on
        Discord ("Edward how tall are you", "Hermes 2 help"). `text` from `speaker`, a persona handing the turn
        on, must say the name to someone: past a label of its own name or wake word ("Mira Vance: ...", "Ed:
        ..."), *actions* and opening quotes ("*turns to him* Sherlock, ...", "“Sherlock, ...”"), and failing
        that past an interjection ("Hey Sherlock, ...", "Well, Holmes!"), the name must be followed by a
        vocative mark (`,` `!` `?` `:` `—` `...` a spaced `-`, the text's end), so that a line about someone
        ("Holmes was wrong about the map", "Ed is too short", "Holmes, ever the skeptic, frowned") hands
        nobody the turn (`_said_to`).
        """
        pool = [self._by_id[c] for c in candidates if c in self._by_id] if candidates is not None else list(self)
        if speaker is None:
            return _named_first(text.lstrip().lower(), pool, _ends_address)
        lowered = _past_own_label(text, speaker).lower()
        start = _openers_end(lowered, 0)
        for _ in range(MAX_INTERJECTIONS):
            if found := _named_first(lowered, pool, _said_to, start):
                return found
            # Not there: past an interjection, if one is there ("Hey Sherlock, ...", "Oh, *turns* Holmes!").
            # A persona named like one ("Yo, your turn") was looked for before it was skipped.
            if (interjection := _INTERJECTION.match(lowered, start)) is None:
                return None
            start = _openers_end(lowered, interjection.end())
        return _named_first(lowered, pool, _said_to, start)


def _named_first(
    lowered: str, pool: Iterable[Persona], said_to: Callable[[str, int], bool], start: int = 0
) -> Persona | None:
    """The persona of `pool` with the longest name or wake word that `lowered` has at `start` and that is
    `said_to` it."""
    best: tuple[int, Persona] | None = None
    for persona in pool:
        for word in persona.addressed_by():
            w = word.lower()
            if lowered.startswith(w, start) and said_to(lowered, start + len(w)):
                if best is None or len(w) > best[0]:
                    best = (len(w), persona)
    return best[1] if best else None


def _past_own_label(text: str, speaker: Persona) -> str:
    """`text` past a leading label of `speaker`'s name or of one of its wake words, the longest that fits
    ("Edward Elric: ...", "**Ed:** ..."): the model labels its own line as it saw the others' labelled."""
    from bot.prompt import without_own_name  # bot.prompt imports this module

    for label in sorted(speaker.addressed_by(), key=len, reverse=True):
        past = without_own_name(text, label)
        if len(past) != len(text):
            return past
    return text


OPENING_QUOTES = "\"“„«「『'‘"
VOCATIVE_MARKS = ",!?:—–…、，！？："
_ACTION = re.compile(r"\*\*[^*\n]+\*\*|\*[^*\n]+\*|_[^_\n]+_")  # *turns to him*, **bold**, _sighs_
# Spaces, quotes and actions, any number in any order. Linear: nothing follows the repetition to backtrack
# for, and each action ends at the first "*", "_" or line break it meets.
_OPENERS = re.compile(rf"(?:[\s{OPENING_QUOTES}]+|{_ACTION.pattern})*")
_SPACES = re.compile(r"\s*")
# Said before a name to call someone ("Hey Sherlock, ...", "Oh, Holmes!"): a short list, English only, and at
# most MAX_INTERJECTIONS in a row ("Oh, hey, Sherlock!").
INTERJECTIONS = ("hey", "hi", "hello", "oh", "ah", "well", "yo", "so", "okay", "ok", "look", "listen")
MAX_INTERJECTIONS = 3
_INTERJECTION = re.compile(rf"(?:{'|'.join(INTERJECTIONS)})(?![\w'’])(?:[,!]\s*|\s+)", re.IGNORECASE)
# After a name: an ellipsis ("Sherlock... are you there?") or a hyphen set off by a space ("Sherlock - what
# do you think?", "Holmes -- look"), not one joining words ("Holmes-style").
_TRAILING_MARK = re.compile(r"\.\.\.|-{1,2}(?:\s|$)")
# "Holmes, ever the skeptic, frowned at the map": a clause between two commas after the name, then a verb in
# the past tense: a word ending in -ed (not -eed: "need", "indeed"), or one of a few common irregular past
# forms that do not also start an imperative or a question (not "let", "put", "left", "was").
PAST_NARRATION = ("said", "took", "knew", "saw", "stood", "sat", "felt", "kept", "held", "went", "came", "gave",
                  "thought", "found", "spoke", "began", "shook", "drew")
_APPOSITION = re.compile(rf",[^,.!?;:\n]+,\s*(?:[a-z]+[a-df-z]ed|{'|'.join(PAST_NARRATION)})\b")


def _past_openers(text: str) -> str:
    """`text` past what comes before the words of a role-play line: *actions*, _actions_, opening quotes."""
    return text[_openers_end(text, 0) :]


def _openers_end(text: str, pos: int) -> int:
    """Where the openers that `text` has at `pos` end. Linear in the length of `text`: one match moves on, no
    slice of the rest is taken per opener (which took seconds on a reply of 400k quotes)."""
    match = _OPENERS.match(text, pos)
    return match.end() if match else pos


def _said_to(text: str, end: int) -> bool:
    """Whether a name that starts `text` and ends at `end` is said to someone: followed, past an honorific
    attached to it and any spaces, by a vocative mark, an ellipsis, a spaced hyphen or the text's end
    ("Sherlock, ...", "Ed!", "Holmes... ", "Sherlock - ", "ミラさん、").

    A comma after the name can also open a clause about the person named, in a narrated line: "Holmes, ever
    the skeptic, frowned at the map." That is told by its shape, `_APPOSITION`: a clause between two commas,
    then a verb in the past tense, the tense role-play narrates in and seldom addresses someone in, and the
    one that a word's spelling gives away. The other rule weighed, that an address after a comma must end in
    "?" or "!" or say "you", loses imperatives: on the tests' and a review's 31 lines it made 2 mistakes
    ("Narrator, describe the storm.", "Ed: Sherlock, look") where this one makes none, and on 34 more
    role-play lines 15 ("Holmes, please.", "Sherlock, over here.") against 5. What this rule lets through is
    narration in the present tense ("Sherlock, pipe in hand, paces the room") or with an irregular verb off
    the list ("Holmes, as always, was right"); what it takes for narration is an address that opens with a
    past tense ("Holmes, old chap, finished yet?").
    """
    pos = end + next((len(h) for h in HONORIFICS if text.startswith(h, end)), 0)
    if spaces := _SPACES.match(text, pos):
        pos = spaces.end()
    if pos == len(text) or _TRAILING_MARK.match(text, pos):
        return True
    return text[pos] in VOCATIVE_MARKS and not (text[pos] == "," and _APPOSITION.match(text, pos))


def _ends_address(text: str, end: int) -> bool:
    """Whether a name that starts `text` and ends at `end` is said to someone ("Ed, ...", "Ed!"), not part
    of a longer word ("Edwardian", "ミラクル", "空港") or a possessive ("Ed's album"). Japanese and Korean
    attach an honorific to the name itself (ミラさん、..., 민수씨)."""
    if end == len(text) or text.startswith(HONORIFICS, end):
        return True
    following = text[end]
    return not following.isalnum() and following not in "'\u2019"
