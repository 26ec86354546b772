"""The openai engine against the local OpenAI-compatible test server: streaming, stops, errors, retries."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from bot.config import Settings
from bot.engine.base import EngineError, Finish, GenerationRequest, TextChunk
from bot.engine.openai_engine import OpenAIEngine, estimated_tokens
from bot.personas import Sampling
from tests.openai_test_server import Drop, Fail, NotStreamed, OpenAITestServer, Reply, Stall, StreamError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_start|>system"}]


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as srv:
        yield srv


async def started(base_url: str, *, context_tokens: int = 8192, **kw: float) -> OpenAIEngine:
    settings = Settings(engine="openai", openai_base_url=base_url, openai_api_key="sk-test", model="hermes-test",
                        context_tokens=context_tokens)
    engine = OpenAIEngine(settings, backoff_s=0.01, **kw)  # type: ignore[arg-type]
    await engine.start()
    return engine


async def fails_with(base_url: str, match: str, **kw: float) -> None:
    """One request through a fresh engine on `base_url` ends in an EngineError matching `match`."""
    engine = await started(base_url, **kw)
    try:
        with pytest.raises(EngineError, match=match):
            await engine.generate_text(GenerationRequest("r", MESSAGES))
    finally:
        await engine.close()


async def test_streams_text_and_sends_sampling(server: OpenAITestServer) -> None:
    server.script(Reply("Hello there, traveller!", chunk_chars=4))
    engine = await started(server.base_url)
    sampling = Sampling(temperature=0.3, top_p=0.9, top_k=20, repetition_penalty=1.2, max_new_tokens=64)
    items = [i async for i in engine.submit(GenerationRequest("r", MESSAGES, sampling, stop=["\nUser:"]))]
    await engine.close()
    chunks = [i.text for i in items if isinstance(i, TextChunk)]
    assert "".join(chunks) == "Hello there, traveller!" and len(chunks) > 1
    assert items[-1] == Finish("stop", prompt_tokens=11, completion_tokens=6)
    body = server.requests[0]
    assert body["stream"] is True and body["model"] == "hermes-test"
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (0.3, 0.9, 20, 64)
    assert body["repeat_penalty"] == 1.2 and body["stop"] == ["\nUser:"]
    assert "<|im_start|>" not in body["messages"][1]["content"]  # defanged
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


async def test_stop_strings_applied_locally_too(server: OpenAITestServer) -> None:
    stops = ["<a>", "<b>", "<c>", "<d>", "\nAlice:"]  # the fifth is past what servers must honour
    server.script(Reply("I am Hermes.\nAlice: hi", chunk_chars=2, finish_reason="length"))
    engine = await started(server.base_url)
    text, finish = await engine.generate_text(GenerationRequest("r", MESSAGES, stop=stops))
    await engine.close()
    assert (text, finish.reason) == ("I am Hermes.", "stop")
    assert server.requests[0]["stop"] == stops[:4]


async def test_a_reply_that_opens_as_another_participant_is_stopped(server: OpenAITestServer) -> None:
    server.script(Reply("Alice: I agree with myself", chunk_chars=2, finish_reason="length"))
    engine = await started(server.base_url)
    text, finish = await engine.generate_text(GenerationRequest("r", MESSAGES, stop=["\nAlice:"]))
    await engine.close()
    assert (text, finish.reason) == ("", "stop")


async def test_a_local_stop_ends_the_reply_without_waiting_for_the_server(server: OpenAITestServer) -> None:
    """The server keeps generating past a stop it does not honour; the reply must end at the stop, not after."""
    server.script(Reply("Hi.\nAlice: " + "more " * 40, chunk_chars=4, delay_s=0.2))  # ~11 s to the end
    engine = await started(server.base_url)
    async with asyncio.timeout(5):
        stops = ["<a>", "<b>", "<c>", "<d>", "\nAlice:"]  # the server only honours the first four
        text, finish = await engine.generate_text(GenerationRequest("r", MESSAGES, stop=stops))
    await engine.close()
    assert (text, finish.reason) == ("Hi.", "stop")


async def test_retries_before_first_token(server: OpenAITestServer) -> None:
    server.script(Fail(503, "loading model"), Fail(429, "slow down"), Reply("ok now"))
    engine = await started(server.base_url)
    text, _ = await engine.generate_text(GenerationRequest("r", MESSAGES))
    await engine.close()
    assert text == "ok now" and len(server.requests) == 3


async def test_client_error_is_not_retried(server: OpenAITestServer) -> None:
    """Not even with a prompt that could be shorter: only a full context is worth that."""
    server.script(Fail(400, "model 'x' not found"), Reply("should not be used"))
    engine = await started(server.base_url, context_tokens=2048)
    with pytest.raises(EngineError, match="answered 400: model 'x' not found$"):
        await engine.generate_text(GenerationRequest("r", LONG_HISTORY, SAMPLING))
    await engine.close()
    assert len(server.requests) == 1


async def test_connection_lost_mid_reply_is_an_error_not_a_retry(server: OpenAITestServer) -> None:
    server.script(Drop("partial te"), Reply("should not be used"))
    engine = await started(server.base_url)
    seen: list[str] = []
    with pytest.raises(EngineError, match="mid-reply"):
        async for item in engine.submit(GenerationRequest("r", MESSAGES)):
            if isinstance(item, TextChunk):
                seen.append(item.text)
    await engine.close()
    assert "".join(seen) == "partial te" and len(server.requests) == 1


def unused_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_server_down_gives_a_clear_error() -> None:
    port = unused_port()
    await fails_with(f"http://127.0.0.1:{port}/v1", f"cannot reach the OpenAI-compatible server at http://127.0.0.1:{port}",
                     attempts=2)


async def test_cancel_while_the_server_stalls(server: OpenAITestServer) -> None:
    server.script(Stall(30))
    engine = await started(server.base_url)
    stream = engine.submit(GenerationRequest("r", MESSAGES))
    await asyncio.sleep(0.1)
    stream.cancel("deadline")
    async with asyncio.timeout(2):
        items = [i async for i in stream]
    await engine.close()
    assert items == [Finish("deadline")]


async def test_resume_sends_the_partial_assistant_turn_and_what_is_left_of_its_budget(server: OpenAITestServer) -> None:
    engine = await started(server.base_url)
    await engine.generate_text(GenerationRequest("r", MESSAGES, assistant_prefix="Once upon"))
    await engine.generate_text(GenerationRequest("r2", MESSAGES, assistant_prefix="word " * 1000))
    await engine.close()
    body = server.requests[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "Once upon"}
    assert body["continue_final_message"] is True
    assert body["max_tokens"] == 400 - 3  # 9 characters: about 3 tokens written of the default 400
    assert server.requests[1]["max_tokens"] == 1  # the whole budget is written: one more token at most


def test_a_long_history_is_cut_to_the_context_oldest_turns_first() -> None:
    """Servers refuse (vLLM: 400) or silently cut the front (Ollama: the system prompt) of a prompt
    longer than their context; the engine leaves out the oldest turns first, as the transformers one does."""
    engine = OpenAIEngine(Settings(engine="openai", openai_base_url="http://127.0.0.1:9/v1", context_tokens=4096))
    turns = [{"role": "user" if i % 2 else "assistant", "content": f"turn {i} " + "x" * 2000} for i in range(50)]
    messages = [{"role": "system", "content": "You are Hermes."}, *turns]
    body = engine.payload(GenerationRequest("r", messages, Sampling(max_new_tokens=400)))
    sent = body["messages"]
    assert sent[0] == messages[0] and sent[-1] == messages[-1] and sent[1:] == messages[-(len(sent) - 1) :]
    estimate = sum(5 + len(m["content"]) / 4 for m in sent)
    assert 2 < len(sent) < len(messages) and 4096 - 400 - 600 < estimate <= 4096 - 400
    assert body["max_tokens"] == 400
    with pytest.raises(EngineError, match="system prompt alone"):
        engine.payload(GenerationRequest("r", [{"role": "system", "content": "rule " * 20_000}, turns[-1]]))


# The reviewer's samples of role-play text, with their real lengths in tokens: counted by Mistral-7B's
# SentencePiece tokenizer (tokenizer.model.v1 from the mistral-common wheel, 32000 pieces, as
# OpenHermes-2.5-Mistral-7B uses) with sentencepiece 0.2.3, `len(sp.encode(text))`. The estimate had been
# up to 2.25 times too low (the URL): a long scene overflowed vLLM's 8192 tokens, and every reply failed.
REAL_TOKENS = {
    "The torch sputters to life, throwing long shadows across barrels stacked to the ceiling. Somewhere behind "
    "them, something small scurries away, and a draft carries the smell of wet earth from a gap in the far wall. "
    "What does Mira do?": 55,
    "*Mira kicks the door open, boots thudding against the warped planks.* \"Who's buying?\" *She tosses a pouch "
    "of coins onto the bar — it lands with a heavy clink.* \"Drinks for the crew, and don't water 'em down this "
    "time, Gregor!\"": 68,
    "lmao ok ok *sits down* wait who's Gregor?? 😂 also can we go to the Rift after this, I wanna see the "
    "storms!!": 36,
    "You have been in Afghanistan, I perceive. The tan of your face stops abruptly at the wrists; your left arm "
    "has been injured, for you hold it stiffly and unnaturally. Elementary, my dear Watson — elementary!": 50,
    "You are to roleplay as Sherlock Holmes, the consulting detective of 221B Baker Street, London, in the late "
    "nineteenth century. Speak in his precise, confident Victorian English, notice small details and reason "
    "aloud from them to bold conclusions, and show impatience with dull questions but delight in a good "
    "puzzle.": 67,
    "*Mira leans on the rail, coat snapping in the wind, and grins.* \"Since always, love. The Rift doesn't care "
    "about your charts.\" *She taps the map — the ink shimmers, redrawing a coastline that wasn't there a moment "
    "ago.* \"See? It's already changed its mind. Gregor! Reef the topsails, and tell Tam to stop eating the "
    "biscuits!\" ": 97,
    "*draws her cutlass and steps between Kit and the stranger* \"Nobody touches my crew. Not today.\"": 25,
    "lol ok *sits on a barrel* so... are we gonna talk about the glowing map or what?? 👀": 25,
    "*squints at the horizon* \"Storm's coming. Maybe an hour, maybe less. We should tie everything down.\"": 29,
    "I check my pockets for the brass key we found yesterday, then hold it up to the lantern light.": 22,
    "\"Wait—wait. You're telling me the Rift *moves*?\" *Bob's jaw drops.* \"Since when?!\"": 31,
    "*Мира пинком открывает дверь.* «Кто угощает? Эй, Грегор, не разбавляй эль на этот раз!»": 42,
    "*ミラはドアを蹴り開けた。*「誰がおごるんだ？グレゴール、今度はエールを薄めるなよ！」": 49,
    "Ναι, βέβαια! *χαμογελάει* Πάμε στο λιμάνι πριν ξεσπάσει η καταιγίδα.": 68,
    "hahaha 😂😂😂 ok ok *pats Kit* 10/10 would sail again!!! >:3": 27,
    "https://cdn.discordapp.com/attachments/1234567890/9876543210/map_v2_FINAL.png": 45,
}


def test_the_length_estimate_is_not_below_the_real_count_of_role_play_text() -> None:
    """Actions in asterisks, quotes, contractions, digits, emoji, Greek and URLs take more tokens than four
    characters of English words each: the estimate must not fall short of the real count on any of them."""
    short = {text[:40]: (estimated_tokens(text), real) for text, real in REAL_TOKENS.items()
             if estimated_tokens(text) < real}
    assert not short, f"estimated below the real count (estimate, real): {short}"
    assert sum(map(estimated_tokens, REAL_TOKENS)) <= 1.25 * sum(REAL_TOKENS.values())  # and not far above


@pytest.mark.parametrize(("text", "chars_per_token"), [("漢字かな" * 250, 1), ("Приветствую" * 100, 2)])
def test_the_length_estimate_counts_scripts_that_take_more_tokens_a_character(text: str, chars_per_token: int) -> None:
    """A Mistral tokenizer spends a token or more on each CJK character and about one on two Cyrillic
    letters: counted at four characters a token, such a history overflows the server's context."""
    engine = OpenAIEngine(Settings(engine="openai", openai_base_url="http://127.0.0.1:9/v1", context_tokens=4096))
    turns = [{"role": "user" if i % 2 else "assistant", "content": text} for i in range(50)]
    body = engine.payload(GenerationRequest("r", [{"role": "system", "content": "You are Hermes."}, *turns],
                                            Sampling(max_new_tokens=400)))
    sent = body["messages"][1:]
    assert 1 < len(sent) and sum(5 + len(m["content"]) / chars_per_token for m in sent) <= 4096 - 400


async def test_missing_base_url_is_a_clear_error() -> None:
    engine = OpenAIEngine(Settings(engine="openai", openai_base_url=None))
    with pytest.raises(EngineError, match="HERMES_OPENAI_BASE_URL"):
        await engine.start()


async def test_events_spread_over_several_data_lines_are_joined(server: OpenAITestServer) -> None:
    server.script(Reply("Hello there, friend.", multiline=True))
    engine = await started(server.base_url)
    items = [item async for item in engine.submit(GenerationRequest("r", MESSAGES))]
    await engine.close()
    assert "".join(i.text for i in items if isinstance(i, TextChunk)) == "Hello there, friend."
    assert items[-1] == Finish("stop", 11, 7)


async def test_a_stream_that_ends_without_saying_it_is_complete_is_an_error(server: OpenAITestServer) -> None:
    """Text, then a clean end with neither finish_reason nor [DONE]: the reply may be cut short, so it
    must not be taken (and stored) as complete."""
    server.script(Reply("Hello wor", clean_end_early=True))
    engine = await started(server.base_url)
    with pytest.raises(EngineError, match="ended the stream mid-reply"):
        async for _ in engine.submit(GenerationRequest("r", MESSAGES)):
            pass
    await engine.close()
    assert len(server.requests) == 1


CONTEXT_FULL = {"code": 400, "message": "the request exceeds the available context size, try increasing it",
                "type": "exceed_context_size_error"}
SAMPLING = Sampling(max_new_tokens=256)
LONG_HISTORY = [{"role": "system", "content": "You are Hermes."}] + [
    {"role": "user" if i % 2 else "assistant", "content": f"turn {i}: " + "the storm is coming " * 15} for i in range(40)
]
VLLM_CONTEXT_FULL = ("This model's maximum context length is 2048 tokens. However, you requested 2301 tokens (2045 in "
                     "the messages, 256 in the completion). Please reduce the length of the messages or completion.")


async def test_a_prompt_the_server_finds_too_long_is_sent_once_more_with_fewer_turns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """vLLM counts more tokens than the estimate and answers 400: the reply still comes, from the same
    request with fewer turns, fitted to 3/4 of HERMES_CONTEXT_TOKENS; one warning names the likely cause."""
    async with OpenAITestServer(max_model_len=2048) as srv:
        engine = await started(srv.base_url, context_tokens=2048)
        with caplog.at_level(logging.WARNING, logger="bot.engine.openai_engine"):
            text, _ = await engine.generate_text(GenerationRequest("r", LONG_HISTORY, SAMPLING))
        await engine.close()
    first, second = srv.requests
    assert text == "echo: " + LONG_HISTORY[-1]["content"]
    assert second["messages"][0] == first["messages"][0] and second["messages"][-1] == first["messages"][-1]
    assert len(second["messages"]) < len(first["messages"])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "answered 400: This model's maximum context length is 2048 tokens" in warning
    assert "retrying once with the prompt fitted to 1536 tokens: HERMES_CONTEXT_TOKENS=2048 is probably above" in warning


async def test_a_server_whose_template_wants_turns_by_turns_gets_them_after_its_first_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """vLLM serving Mistral Instruct refused every prompt with example framing, a reminder or two people in a row."""
    messages = [
        {"role": "system", "content": "You are Vega."}, {"role": "system", "content": "[An example]"},
        {"role": "user", "content": "Status?"}, {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "Alice: hi"}, {"role": "user", "content": "Bob: hello"},
    ]
    async with OpenAITestServer(roles_by_turns=True) as srv:
        engine = await started(srv.base_url)
        with caplog.at_level(logging.WARNING, logger="bot.engine.openai_engine"):
            first, _ = await engine.generate_text(GenerationRequest("a", messages, SAMPLING))
            second, _ = await engine.generate_text(GenerationRequest("b", messages, SAMPLING))
        await engine.close()
    assert first == second == "echo: Alice: hi\n\nBob: hello"  # the two people's lines, joined
    assert [[m["role"] for m in r["messages"]] for r in srv.requests[1:]] == [["system", "user", "assistant", "user"]] * 2
    assert len(srv.requests) == 3  # the second request went turn by turn at once
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "roles must alternate" in warning and "turn by turn from now on" in warning


@pytest.mark.parametrize("answer", [
    Fail(400, VLLM_CONTEXT_FULL),  # vLLM
    Fail(400, "Please reduce the length of the messages.", code="context_length_exceeded"),  # OpenAI
    StreamError(CONTEXT_FULL, shape="error-line"),  # llama.cpp, in the stream
    Fail(400, "request (2301 tokens) exceeds the available context size (2048 tokens)"),  # llama.cpp
    Fail(200, "Trying to keep the first 2301 tokens when context the overflows. However, the model is loaded "
              "with context length of only 2048 tokens, which is not enough."),  # LM Studio, with a 200
    Fail(422, "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. Given: 2045 `inputs` "
              "tokens and 256 `max_new_tokens`"),  # TGI
    # A full context reported with a 5xx was retried as a passing trouble: the same prompt, refused again.
    Fail(500, VLLM_CONTEXT_FULL),
    StreamError({**CONTEXT_FULL, "code": 500}, shape="data"),
], ids=["vllm", "openai", "llama.cpp-stream", "llama.cpp", "lm-studio", "tgi", "http-500", "stream-500"])
async def test_each_servers_full_context_answer_is_retried_with_fewer_turns(
    server: OpenAITestServer, answer: Fail | StreamError
) -> None:
    server.script(answer, Reply("ok now"))
    engine = await started(server.base_url, context_tokens=2048)
    text, _ = await engine.generate_text(GenerationRequest("r", LONG_HISTORY, SAMPLING))
    await engine.close()
    first, second = server.requests
    assert text == "ok now" and len(second["messages"]) < len(first["messages"])


async def test_a_second_full_context_answer_is_a_clear_error_not_a_loop(server: OpenAITestServer) -> None:
    server.script(Fail(400, VLLM_CONTEXT_FULL), Fail(400, VLLM_CONTEXT_FULL), Reply("should not be used"))
    engine = await started(server.base_url, context_tokens=2048)
    with pytest.raises(EngineError, match=r"answered 400: This model's maximum context length is 2048 tokens\..* "
                       r"\(also with the prompt fitted to 1536 tokens; HERMES_CONTEXT_TOKENS=2048 is probably above "
                       r"the server's context: set it to the server's context size or below\)$"):
        await engine.generate_text(GenerationRequest("r", LONG_HISTORY, SAMPLING))
    await engine.close()
    assert len(server.requests) == 2


async def test_a_full_context_is_retried_only_before_any_text(server: OpenAITestServer) -> None:
    """Before any text the shorter prompt goes out; after some (LM Studio: "Reached context length ...
    mid-generation") a retry would repeat text the user has seen: an error, naming the setting."""
    server.script(StreamError(CONTEXT_FULL, shape="event"), Reply("ok now"),
                  StreamError(CONTEXT_FULL, shape="event", text_before="Hi"), Reply("should not be used"))
    engine = await started(server.base_url, context_tokens=2048)
    text, _ = await engine.generate_text(GenerationRequest("r", LONG_HISTORY, SAMPLING))
    with pytest.raises(EngineError, match=r"exceeds the available context size.*\(HERMES_CONTEXT_TOKENS=2048 is"):
        await engine.generate_text(GenerationRequest("r", LONG_HISTORY, SAMPLING))
    await engine.close()
    assert text == "ok now" and len(server.requests) == 3


@pytest.mark.parametrize(("shape", "done"), [("error-line", True), ("error-line", False), ("event", True)])
async def test_an_error_the_server_reports_in_the_stream_is_its_error_and_a_400_is_not_retried(
    server: OpenAITestServer, shape: str, done: bool
) -> None:
    """llama.cpp reports a full context as an `error:` line (then [DONE], or not), other servers as an
    `event: error`: before, the reply ended empty as if complete, or was retried with the cause hidden.
    With no turn to leave out, a shorter prompt is not to be had: the error comes at once."""
    server.script(StreamError(CONTEXT_FULL, shape=shape, done=done), Reply("should not be used"))  # type: ignore[arg-type]
    await fails_with(server.base_url, "reported an error: the request exceeds the available context size")
    assert len(server.requests) == 1


async def test_a_passing_error_in_the_stream_before_any_text_is_retried(server: OpenAITestServer) -> None:
    server.script(StreamError({"code": 503, "message": "Loading model"}, shape="error-line"), Reply("ok now"))
    engine = await started(server.base_url)
    text, _ = await engine.generate_text(GenerationRequest("r", MESSAGES))
    await engine.close()
    assert text == "ok now" and len(server.requests) == 2


async def test_an_error_event_without_a_message_is_still_the_servers_error(server: OpenAITestServer) -> None:
    server.script(StreamError({"code": 400, "type": "invalid_request_error"}, shape="event", text_before="Hi"))
    await fails_with(server.base_url, 'reported an error: {"code": 400, "type": "invalid_request_error"}')


async def test_null_error_and_null_usage_counts_are_a_normal_reply(server: OpenAITestServer) -> None:
    """Some servers send `"error": null` in every chunk and null counts in the usage: neither is an error."""
    usage = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}
    server.script(Reply("Hello there", chunk_chars=4, extra={"error": None}, usage=usage))
    engine = await started(server.base_url)
    text, finish = await engine.generate_text(GenerationRequest("r", MESSAGES))
    await engine.close()
    assert (text, finish) == ("Hello there", Finish("stop", prompt_tokens=0, completion_tokens=3))


async def test_surrogates_a_server_escapes_in_its_json_are_joined_or_replaced(server: OpenAITestServer) -> None:
    """JSON may escape UTF-16 surrogates ("\\ud83d"), which json.loads keeps and no UTF-8 encoder takes: the
    reply could be neither stored nor sent through Redis. A pair becomes its emoji, a lone one U+FFFD, in
    the text and in a reported error alike."""
    server.script(Reply("a \ud83d\ude00 and half \ud83d.", chunk_chars=100))
    engine = await started(server.base_url)
    text, _ = await engine.generate_text(GenerationRequest("r", MESSAGES))
    assert text == "a \U0001f600 and half \ufffd."
    server.script(Fail(400, "bad byte \udc80"))
    with pytest.raises(EngineError, match="answered 400: bad byte \ufffd$"):
        await engine.generate_text(GenerationRequest("r", MESSAGES))
    await engine.close()


async def test_a_base_url_without_v1_is_named_when_lm_studio_answers_200_with_an_error() -> None:
    """LM Studio answers an unknown path 200 with {"error": ...}: before, that was retried as a stream
    closed before any text, and the wrong base URL never named."""
    async with OpenAITestServer(unknown_paths_200=True) as srv:
        engine = await started(srv.base_url.removesuffix("/v1"))
        with pytest.raises(EngineError, match=r"answered an error: Unexpected endpoint or method\. "
                           r"\(POST /chat/completions\) instead of an event stream \(check that "
                           r"HERMES_OPENAI_BASE_URL ends in /v1"):
            await engine.generate_text(GenerationRequest("r", MESSAGES))
        assert not await engine.ready()
        await engine.close()
        assert [r for r in srv.unknown if r.startswith("POST")] == ["POST /chat/completions"]


async def test_a_json_answer_to_a_stream_request_is_reported_not_retried(server: OpenAITestServer) -> None:
    server.script(NotStreamed("Hello"), Reply("should not be used"))
    await fails_with(server.base_url, "answered JSON instead of an event stream$")
    assert len(server.requests) == 1


async def test_ready_only_while_the_server_answers(server: OpenAITestServer) -> None:
    engine = await started(server.base_url)
    assert await engine.ready()
    await server.close()
    assert not await engine.ready()
    await engine.close()


async def test_start_warns_naming_the_server_that_does_not_answer(caplog: pytest.LogCaptureFixture) -> None:
    """A compose stack may start the worker before LM Studio: start() goes on, but says so."""
    url = f"http://127.0.0.1:{unused_port()}/v1"
    with caplog.at_level(logging.WARNING, logger="bot.engine.openai_engine"):
        engine = await started(url)
    await engine.close()
    assert f"the server at {url}/models does not answer" in caplog.text


async def test_close_ends_every_open_stream(server: OpenAITestServer) -> None:
    """One stream mid-reply, one submitted just now: both must end when the engine closes (before, their
    readers waited forever)."""
    server.script(Reply("a b c d e f g h i j k", chunk_chars=2, delay_s=0.5))
    engine = await started(server.base_url)
    streaming = engine.submit(GenerationRequest("r1", MESSAGES))
    first = await anext(aiter(streaming))
    just_submitted = engine.submit(GenerationRequest("r2", MESSAGES))
    await engine.close()
    assert first == TextChunk("a ")
    for stream in (streaming, just_submitted):
        with pytest.raises(EngineError, match="shutting down"):
            async with asyncio.timeout(2):
                async for _ in stream:
                    pass


PASSWORD = "S3cretPassw0rd"


@pytest.mark.parametrize("port", ["unused", "99999"])
async def test_a_password_in_the_base_url_is_in_no_message(port: str, caplog: pytest.LogCaptureFixture) -> None:
    """A proxy's user and password in HERMES_OPENAI_BASE_URL: the start warning and the error of a reply name
    the server with the password masked, also where aiohttp names the URL itself (a port it cannot use)."""
    url = f"http://hermes:{PASSWORD}@127.0.0.1:{unused_port() if port == 'unused' else port}/v1"
    engine = OpenAIEngine(Settings(engine="openai", openai_base_url=url), attempts=1)
    with caplog.at_level(logging.WARNING, logger="bot.engine.openai_engine"):
        await engine.start()
    try:
        with pytest.raises(EngineError) as raised:
            await engine.generate_text(GenerationRequest("r", MESSAGES))
    finally:
        await engine.close()
    for text in (caplog.text, str(raised.value)):
        assert "hermes:***@127.0.0.1" in text and PASSWORD not in text


async def test_url_credentials_are_basic_auth_and_refused_with_an_api_key(server: OpenAITestServer) -> None:
    """Both are the Authorization header: aiohttp refused each request (a traceback at start, from the probe)."""
    url = server.base_url.replace("http://", f"http://hermes:{PASSWORD}@")
    with pytest.raises(EngineError, match="HERMES_OPENAI_BASE_URL holds a user and password .* HERMES_OPENAI_API_KEY"):
        await started(url)
    engine = OpenAIEngine(Settings(engine="openai", openai_base_url=url))
    await engine.start()
    await engine.generate_text(GenerationRequest("r", MESSAGES))
    await engine.close()
    assert server.headers[0]["Authorization"] == "Basic " + base64.b64encode(f"hermes:{PASSWORD}".encode()).decode()
