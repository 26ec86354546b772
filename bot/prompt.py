"""Chat turns -> model messages -> the exact model prompt, within the model's token budget.

The model sees ChatML through the tokenizer's own chat template. Three rules keep it honest:
- untrusted text (users, stored model output) never becomes control tokens: token ids are made with
  `apply_chat_template(..., sanitize_control_tokens=True)`, and look-alikes of control tokens are defanged for
  both engines (a remote server tokenizes text itself; a template may write its markers as plain text);
- with several people in a conversation every user line carries its speaker's display name (a person who
  goes by a persona's name is "Name (player)"), and the persona is stopped when it starts writing another
  participant's line;
- a persona's example dialogue is marked as such, apart from the conversation, and is kept or dropped whole;
- the prompt fits the context minus the reply's max tokens: the oldest turns go first, the system
  prompt and the newest turn always stay.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jinja2

from bot.personas import Persona

Role = Literal["user", "assistant", "system"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LORE_SCAN_TURNS = 6  # how far back a mention still brings a lore entry into the prompt
LORE_MAX_ENTRIES = 8
LORE_HEADING = "Background that matters right now:"
# A persona's example dialogue, between the system prompt and the conversation, framed so that the model takes it
# for what it is (SillyTavern's "[Example Chat]" ... "[Start a new Chat]"); the same text prompt after prompt, so
# the system prompt and the examples stay one cacheable prefix.
EXAMPLES_INTRO = "[An example of how {name} talks, not part of the conversation]"
EXAMPLES_END = "[The conversation starts here]"
EXAMPLE_USER = "friend"  # who speaks an example's user lines where real ones carry names (a card's {{user}} too)
PLAYER = "{name} (player)"  # a person who goes by a persona's name, as the prompt names them
_SPEAKER_LABEL = re.compile(r"[^\s:*_\"'][^:\n]{0,40}:\s")  # "Mira: I light a torch" already names its speaker
_OVERLONG_WARNING = "Token indices sequence length is longer than the specified maximum sequence length"

# Control-token shapes of chat templates and tokenizers: ChatML, Llama 3/4 and Phi (<|...|>), DeepSeek (full-width
# bars), Llama 2/Mistral (<s>, [INST], [SYSTEM_PROMPT], tool, image and fill-in-the-middle markers), Gemma
# (<start_of_turn>, image tokens), Qwen 3 (<think>, tool calls), GLM ([gMASK], <sop>), Seed (<seed:bos>), MiniMax
# (]~b]), image placeholders (LLaVA's <image>, Idefics', InternVL's, llama.cpp's <__media__>) and <unk>/<mask>.
_ANGLE_TOKENS = (
    "s", "bos", "eos", "pad", "unk", "mask", "sop", "eop", "start_of_turn", "end_of_turn", "start_of_image",
    "end_of_image", "image_soft_token", "image", "img", "IMG_CONTEXT", "fake_token_around_image", "__media__",
    "think", "tool_call", "tool_response",
)
_SQUARE_TOKENS = (
    "INST", "SYSTEM_PROMPT", "AVAILABLE_TOOLS", "TOOL_CALLS", "TOOL_RESULTS", "TOOL_CONTENT", "THINK", "IMG",
    "IMG_BREAK", "IMG_END", "ARGS", "CALL_ID", "PREFIX", "MIDDLE", "SUFFIX", "gMASK", "sMASK", "MASK",
)
_CONTROL_TOKEN_RE = re.compile(
    r"<[|\uff5c][^|\uff5c<>\s]{1,64}[|\uff5c]>"
    rf"|</?(?:{'|'.join(_ANGLE_TOKENS)})>|\[/?(?:{'|'.join(_SQUARE_TOKENS)})\]"
    r"|<seed:[a-z_]+>|\]~!?b[\]\[]"
)


@dataclass(frozen=True)
class ChatTurn:
    """One stored line of a conversation, as the prompt builder needs it."""

    role: Role
    content: str
    author: str | None = None  # display name of a user; None for a single anonymous user
    persona_id: str | None = None  # which persona spoke, for assistant turns


@functools.lru_cache(maxsize=256)
def _own_label(name: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """A leading `Name:`, `**Name:**` or `**Name**:` (any case, any spacing), and a pattern that matches every
    text that could still grow into one ("Mira Va", "**Mira Vance*")."""
    words = [[re.escape(char) for char in word] for word in name.split()]
    name_tokens = list(itertools.chain.from_iterable(
        ([r"\s+"] if i else []) + word for i, word in enumerate(words)
    ))
    ws, colon, star = r"\s*", ":", r"\*"
    forms = [
        [*name_tokens, ws, colon],
        [star, star, ws, *name_tokens, ws, colon, ws, star, star],
        [star, star, ws, *name_tokens, ws, star, star, ws, colon],
    ]

    def prefixes(tokens: list[str]) -> str:  # every prefix of the tokens' sequence, the empty one included
        rest = ""
        for token in reversed(tokens):
            rest = f"(?:{token}{rest})?"
        return rest

    full = re.compile(r"\s*(?:" + "|".join("".join(form) for form in forms) + r")\s*", re.IGNORECASE)
    start = re.compile(r"\s*(?:" + "|".join(prefixes(form) for form in forms) + ")", re.IGNORECASE)
    return full, start


def without_own_name(text: str, name: str, *, partial: bool = False) -> str:
    """A reply's `text` without a leading label of its speaker's own `name` ("Mira Vance: *grins* ..." is
    "*grins* ..."; `**Mira Vance:**` and `**Mira Vance**:` too, in any case): the model copies the `Name:` that
    other speakers' lines carry, and the reply is shown under the name already.

    `partial`: `text` is a reply still being streamed; while it could still become such a label ("Mira Va")
    it is "", so the name never flashes up. Apply it to the whole text so far at every update, and once more
    without `partial` to the finished reply (a reply that is just "Mira" is "Mira"). The shown text only ever
    grows: what was shown is never taken back.

    Only the start of the reply is looked at. SillyTavern also removes `Name:` at the start of every later
    line, but there it can be real text: a persona writing a scene or a transcript labels its own lines as
    it labels the others' (why the persona's own name is never one of its stop strings).
    """
    full, start = _own_label(name)
    if match := full.match(text):
        return text[match.end() :]
    return "" if partial and start.fullmatch(text) else text


def _taken_names(persona: Persona, names: Mapping[str, str]) -> set[str]:
    return {persona.name.casefold(), *(name.casefold() for name in names.values())}


def _user_label(author: str, taken: set[str]) -> str:
    """A person's name in the prompt: their display name, or "Narrator (player)" for a person who goes by a
    persona's name, so that neither the model nor a stop string can take one for the other."""
    return PLAYER.format(name=author) if author.casefold() in taken else author


def _speaker_names(persona: Persona, turns: Sequence[ChatTurn], names: Mapping[str, str]) -> list[str]:
    """Everyone but `persona` itself who speaks in `turns`, first appearance first, as the prompt names them
    (a user who shares the persona's name is someone else, and counts, as "Name (player)")."""
    seen: dict[str, None] = {}
    taken = _taken_names(persona, names)
    for turn in turns:
        if turn.role == "user" and turn.author:
            seen.setdefault(_user_label(turn.author, taken), None)
        elif turn.role == "assistant" and turn.persona_id and turn.persona_id != persona.id:
            seen.setdefault(names.get(turn.persona_id, turn.persona_id), None)
    return list(seen)


def is_multi_speaker(persona: Persona, turns: Sequence[ChatTurn], names: Mapping[str, str] | None = None) -> bool:
    """Several people, or other personas, take part: lines need their speaker's name."""
    others = _speaker_names(persona, turns, names or {})
    other_personas = any(t.role == "assistant" and t.persona_id not in (None, persona.id) for t in turns)
    return len(others) > 1 or other_personas


def relevant_lore(persona: Persona, turns: Sequence[ChatTurn]) -> list[str]:
    """The persona's lore entries whose keys appear, as whole words in any case, in the newest
    LORE_SCAN_TURNS turns; at most LORE_MAX_ENTRIES, in the persona file's order."""
    recent = "\n".join(turn.content for turn in turns[-LORE_SCAN_TURNS:])
    found = (entry.content for entry in persona.lore if entry.pattern.search(recent))
    return list(itertools.islice(found, LORE_MAX_ENTRIES))


def example_messages(persona: Persona, *, multi: bool = False) -> list[dict[str, str]]:
    """The persona's example dialogue as model messages: each example chat (a card's `<START>` block) after a
    system line that says it is an example, and a system line that starts the real conversation after them.
    In a conversation whose lines carry their speakers' names (`multi`), an example's user line does too
    (EXAMPLE_USER, unless it names its speaker itself), so it never reads as an unnamed real person's."""
    if not persona.examples:
        return []
    intro = {"role": "system", "content": EXAMPLES_INTRO.format(name=persona.name)}
    messages: list[dict[str, str]] = []
    for index, example in enumerate(persona.examples):
        if index == 0 or example.start:
            messages.append(intro)
        content = example.content
        if multi and example.role == "user" and not _SPEAKER_LABEL.match(content):
            content = f"{EXAMPLE_USER}: {content}"
        messages.append({"role": example.role, "content": content})
    messages.append({"role": "system", "content": EXAMPLES_END})
    return messages


def build_messages(
    persona: Persona, turns: Sequence[ChatTurn], *, persona_names: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """Model messages for `persona` answering after `turns` (oldest first).

    `persona_names` maps other personas' ids to display names, for channels where several speak.
    Their lines reach this persona as named user lines, never as its own assistant turns; a person who goes
    by a persona's name is "Name (player)". A stored reply that starts with its speaker's own name (stored
    before replies were cleaned of it) is shown without it. The example dialogue comes after the system
    prompt, framed as examples. Lore the conversation just mentioned comes as a system line right before
    the newest turn, after the persona's reminder: the system prompt, the examples and the history before
    it stay the same prompt after prompt, so their KV cache stays reusable.
    """
    names = persona_names or {}
    multi = is_multi_speaker(persona, turns, names)
    taken = _taken_names(persona, names)
    messages: list[dict[str, str]] = [{"role": "system", "content": persona.system_prompt}]
    messages += example_messages(persona, multi=multi)
    for turn in turns:
        if turn.role == "assistant" and turn.persona_id in (None, persona.id):
            messages.append({"role": "assistant", "content": without_own_name(turn.content, persona.name)})
        elif turn.role == "assistant":
            speaker = names.get(turn.persona_id or "", turn.persona_id or "assistant")
            messages.append({"role": "user", "content": f"{speaker}: {without_own_name(turn.content, speaker)}"})
        elif turn.role == "system":
            messages.append({"role": "system", "content": turn.content})
        elif multi and turn.author:
            messages.append({"role": "user", "content": f"{_user_label(turn.author, taken)}: {turn.content}"})
        else:
            messages.append({"role": "user", "content": turn.content})
    notes = [persona.reminder] if persona.reminder else []
    if lore := relevant_lore(persona, turns):
        notes.append(LORE_HEADING + "\n" + "\n".join(f"- {fact}" for fact in lore))
    if turns and notes:  # the last message is the newest turn
        messages.insert(len(messages) - 1, {"role": "system", "content": "\n\n".join(notes)})
    return messages


def stop_strings(
    persona: Persona, turns: Sequence[ChatTurn], *, persona_names: Mapping[str, str] | None = None
) -> list[str]:
    """The persona's own stops plus the start of any other participant's line ("\\nAlice:", "\\nNarrator
    (player):" for a person who goes by a persona's name), then of any other persona's, spoken yet or not (a
    reply that opens with Holmes's line is not Holmes handing the turn on); never its own name, which it may
    well write ("Ed: ..." quoting itself is not impersonation)."""
    stops = list(persona.stop)
    if is_multi_speaker(persona, turns, persona_names):
        others = [*_speaker_names(persona, turns, persona_names or {}), *(persona_names or {}).values()]
        stops += [f"\n{name}:" for name in others if name != persona.name]
    return list(dict.fromkeys(stops))


def defang_control_tokens(text: str) -> str:
    """Break control-token look-alikes with a zero-width space: a server tokenizes text itself, and a
    template may write turn markers as plain text."""
    return _CONTROL_TOKEN_RE.sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)


def _template_kwargs(tokenizer: Any) -> dict[str, Any]:
    return {} if getattr(tokenizer, "chat_template", None) else {"chat_template": CHATML_TEMPLATE}


def render_text(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text exactly as the chat template writes it (user text left verbatim)."""
    return str(
        tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True, **_template_kwargs(tokenizer)
        )
    )


def encode(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids with control tokens inside message contents encoded as plain text. A template that refuses
    the messages' order (Llama 2's, Mistral Instruct's, Gemma's: "roles must alternate") gets them
    `alternating`."""
    try:
        return _render(tokenizer, messages)
    except jinja2.TemplateError:
        folded = alternating(messages)
        if folded == [dict(m) for m in messages]:
            raise
        return _render(tokenizer, folded)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        add_generation_prompt=True,
        sanitize_control_tokens=True,
        return_dict=True,
        **_template_kwargs(tokenizer),
    )
    return list(out["input_ids"])


def alternating(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """`messages` as templates that take one leading system message and then user and assistant turns by
    turns, a user's first, want them: a later system line (example framing, reminder, lore) joins the next
    user line, or stands as one before the persona's line; lines of one role in a row (several people
    talking) are joined; a conversation that opens with the persona's line (a greeting) opens with a user
    line saying where the conversation starts."""
    out: list[dict[str, str]] = []
    notes: list[str] = []
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system" and index > 0:
            notes.append(content)
            continue
        if role == "assistant" and (notes or not out or out[-1]["role"] == "system"):
            _joined(out, "user", "\n\n".join(notes or [EXAMPLES_END]))
            notes = []
        elif role == "user" and notes:
            content, notes = "\n\n".join([*notes, content]), []
        _joined(out, role, content)
    if notes:
        _joined(out, "user", "\n\n".join(notes))
    return out


def _joined(out: list[dict[str, str]], role: str, content: str) -> None:
    """Append a line to `out`, or join it to the last one when that has the same role (not the system's)."""
    if out and out[-1]["role"] == role != "system":
        out[-1] = {"role": role, "content": f"{out[-1]['content']}\n\n{content}"}
    else:
        out.append({"role": role, "content": content})


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    messages: list[dict[str, str]]  # what was kept
    dropped: int  # messages left out for the budget: the oldest turns, the examples when they had to go
    truncated_newest: bool  # the newest turn alone was too long and lost its beginning


class PromptTooLong(ValueError):
    """Even the system prompt alone does not fit the context window."""


def _keep(messages: list[dict[str, str]], pinned: int, drop: int) -> list[dict[str, str]]:
    return messages[:pinned] + messages[pinned + drop :]


def reply_budget(max_new_tokens: int, context_tokens: int) -> int:
    """Tokens kept free for the reply: the persona's max_new_tokens, but at most half the context, so a
    small context still leaves the conversation room."""
    return min(max_new_tokens, context_tokens // 2)


def _not_overlong_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_OVERLONG_WARNING)


def quiet_overlong_warning() -> None:
    """Drop transformers' "Token indices sequence length is longer than the specified maximum ... will result
    in indexing errors": encode_messages encodes the whole history, then trims it to the context, so no
    such sequence reaches the model. A filter on the logger that warns (adding it again is a no-op)."""
    logging.getLogger("transformers.tokenization_utils_base").addFilter(_not_overlong_warning)


def _example_block_end(msgs: Sequence[Mapping[str, str]]) -> int:
    """Where the pinned head of a prompt ends: after the system prompt and the example dialogue that follows it
    (through EXAMPLES_END), or after the system prompt alone; the newest message is never part of it."""
    if not msgs or msgs[0]["role"] != "system":
        return 0
    intro = EXAMPLES_INTRO.partition("{name}")[0]
    if len(msgs) < 3 or msgs[1]["role"] != "system" or not msgs[1]["content"].startswith(intro):
        return 1
    for index, message in enumerate(msgs[2:-1], start=2):
        if message["role"] == "system" and message["content"] == EXAMPLES_END:
            return index + 1
    return 1


def _fewest_dropped(
    tokenizer: Any, msgs: list[dict[str, str]], pinned: int, budget: int, least: int
) -> tuple[int, list[int]] | None:
    """The smallest number (at least `least`) of the oldest messages after `pinned` to drop so that the rest
    fits `budget`, with the ids; None when even keeping only the newest does not fit. A binary search: O(log n)
    template renders."""
    lo, hi = least, max(len(msgs) - pinned - 1, 0)
    best: tuple[int, list[int]] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = encode(tokenizer, _keep(msgs, pinned, mid))
        if len(candidate) <= budget:
            best, hi = (mid, candidate), mid - 1
        else:
            lo = mid + 1
    return best


def encode_messages(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, context_tokens: int, max_new_tokens: int
) -> EncodedPrompt:
    """Encode `messages` so that prompt + reply fit `context_tokens`, dropping the oldest turns first;
    the reply keeps `reply_budget` of the context. Both engines and `hermes-bot prompt` fit prompts here.

    The leading system message and the newest message are always kept. The example dialogue after the system
    prompt (`example_messages`) is kept whole while the oldest turns go; when it does not fit beside the
    newest turn even so, it goes whole, never a user line without its reply. A binary search over how many
    turns to drop keeps this at O(log n) template renders. Control-token look-alikes are defanged first:
    `sanitize_control_tokens` covers a tokenizer's special tokens only, and many templates write their turn
    markers as plain text (Zephyr's <|user|>), which a user could forge.
    """
    msgs = [{**m, "content": defang_control_tokens(m["content"])} for m in messages]
    budget = context_tokens - reply_budget(max_new_tokens, context_tokens)
    ids = encode(tokenizer, msgs)
    if len(ids) <= budget:
        return EncodedPrompt(ids, msgs, 0, False)
    system = 1 if msgs and msgs[0]["role"] == "system" else 0
    pinned = _example_block_end(msgs)
    examples_dropped = 0
    found = _fewest_dropped(tokenizer, msgs, pinned, budget, least=1)
    if found is None and pinned > system:  # the examples leave the newest turn no room: they go, as a whole
        msgs, examples_dropped, pinned = msgs[:system] + msgs[pinned:], pinned - system, system
        found = _fewest_dropped(tokenizer, msgs, pinned, budget, least=0)
    if found is not None:
        return EncodedPrompt(found[1], _keep(msgs, pinned, found[0]), examples_dropped + found[0], False)
    droppable = max(len(msgs) - pinned - 1, 0)
    return _truncate_newest(tokenizer, _keep(msgs, pinned, droppable), examples_dropped + droppable, budget)


def _truncate_newest(
    tokenizer: Any, msgs: list[dict[str, str]], dropped: int, budget: int
) -> EncodedPrompt:
    """Only the system prompt and the newest turn are left and still too long: keep the newest turn's end."""
    overhead = len(encode(tokenizer, msgs[:-1] + [{**msgs[-1], "content": ""}]))
    room = budget - overhead
    if room <= 0:
        raise PromptTooLong(f"the system prompt alone needs {overhead} tokens; the budget is {budget}")
    content_ids = tokenizer.encode(msgs[-1]["content"], add_special_tokens=False)
    tail = tokenizer.decode(content_ids[-room:])
    while True:
        trimmed = msgs[:-1] + [{**msgs[-1], "content": tail}]
        ids = encode(tokenizer, trimmed)
        if len(ids) <= budget or not tail:
            return EncodedPrompt(ids, trimmed, dropped, True)
        tail = tail[max(1, len(tail) // 20) :]
