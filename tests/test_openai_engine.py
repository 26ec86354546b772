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
from bot.engine.openai_engine import OpenAIEngine
from bot.personas import Sampling
from tests.openai_test_server import Drop, Fail, NotStreamed, OpenAITestServer, Reply, Stall, StreamError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_start|>system"}]


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as srv:
        yield srv


async def started(base_url: str, **kw: float) -> OpenAIEngine:
    settings = Settings(engine="openai", openai_base_url=base_url, openai_api_key="sk-test", model="hermes-test")
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
    server.script(Fail(400, "model 'x' not found"))
    await fails_with(server.base_url, "answered 400: model 'x' not found")
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


@pytest.mark.parametrize(("shape", "done"), [("error-line", True), ("error-line", False), ("event", True)])
async def test_an_error_the_server_reports_in_the_stream_is_its_error_and_a_400_is_not_retried(
    server: OpenAITestServer, shape: str, done: bool
) -> None:
    """llama.cpp reports a full context as an `error:` line (then [DONE], or not), other servers as an
    `event: error`: before, the reply ended empty as if complete, or was retried with the cause hidden."""
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
