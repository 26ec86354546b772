"""The transformers engine on the tiny model, and its pure parts (detokenizer, stops, sampling, prefix LRU)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bot.config import Settings
from bot.devtools import build_tokenizer
from bot.engine import batched_linear, transformers_engine
from bot.engine.base import EngineError, Finish, GenerationRequest, GenerationStream, TextChunk
from bot.engine.decode import KV_BLOCK, PAD_ID, DecodeGraphs, decode_logits
from bot.engine.kv import (
    KV_SHARE,
    Attention,
    PrefillCache,
    PrefixCache,
    PrefixEntry,
    SlotKV,
    causal_mask,
    common_prefix,
    prefill_positions,
    slot_bytes,
    slots_that_fit,
)
from bot.engine.sampling import apply_repetition_penalty, sample_next
from bot.engine.text import IncrementalDetokenizer, StopMatcher
from bot.engine.transformers_engine import MIN_SHARED_PREFIX, TransformersEngine, load_model
from bot.personas import Sampling
from bot.prompt import encode_messages

GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=24)


def chat(text: str, system: str = "You are a helpful assistant.") -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    tokenizer, model, _ = load_model(Settings(model=str(tiny_model_dir), device="cpu"))
    return tokenizer, model


@pytest.fixture(params=[False, True], ids=["eager-decode", "graph-buckets"])
async def engine(
    loaded: tuple[Any, Any], tiny_model_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[TransformersEngine]:
    """The engine with exact decode steps (the CPU's way), and with the padded buckets a GPU's CUDA graphs
    replay, here run eagerly."""
    tokenizer, model = loaded
    settings = Settings(model=str(tiny_model_dir), device="cpu", max_batch_size=4, context_tokens=1024)
    eng = TransformersEngine(settings, model=model, tokenizer=tokenizer, cuda_graphs=request.param)
    await eng.start()
    yield eng
    await eng.close()


def reference(engine: TransformersEngine, messages: list[dict[str, str]], max_new: int) -> str:
    """One-at-a-time greedy model.generate(), decoded; a trailing partial character is not text yet."""
    ids = encode_messages(engine.tokenizer, messages, context_tokens=1024, max_new_tokens=max_new).ids
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
    new = [t for t in out[0, len(ids) :].tolist() if t != engine.tokenizer.eos_token_id]
    return str(engine.tokenizer.decode(new, skip_special_tokens=True)).rstrip("\ufffd")


# --- pure parts -------------------------------------------------------------------------------


def test_detokenizer_never_emits_half_a_character(loaded: tuple[Any, Any]) -> None:
    tokenizer, _ = loaded
    text = "naïve café 日本語のテキスト emoji 🙂🎉 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens end mid-character and were held back


def test_detokenizer_on_random_byte_soup_matches_a_full_decode(loaded: tuple[Any, Any]) -> None:
    """Random ids split characters across tokens in every way; the stream must still add up."""
    tokenizer, _ = loaded
    rng = torch.Generator().manual_seed(5)
    for _ in range(30):
        ids = torch.randint(5, len(tokenizer), (40,), generator=rng).tolist()
        detok = IncrementalDetokenizer(tokenizer)
        streamed = "".join(detok.push(i) for i in ids)
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def byte_fallback_tokenizer() -> Any:
    """A Llama/Mistral-style tokenizer: SentencePiece spaces ("▁"), and every character outside its small
    vocabulary spelled as UTF-8 byte tokens (`<0xF0><0x9F>...`), decoded run by run as OpenHermes' is."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate("▁!.,abcdefghijklmnopqrstuvwxyzG")})
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", eos_token="</s>")


def test_detokenizer_with_byte_fallback_tokens_keeps_emoji_whole_also_when_resumed() -> None:
    """A window that started inside an emoji's byte tokens made the decoder answer U+FFFD for the whole run."""
    tokenizer = byte_fallback_tokenizer()
    text = "Great! 😊😊✨😊 ok 日本語 🙂🎉 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and len(ids) > 3 * len(text.split())  # mostly byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    for cut in range(1, len(ids)):  # a resumed reply: the user saw decode(ids[:cut]), whole characters only
        shown = tokenizer.decode(ids[:cut])
        if not shown.endswith("\ufffd"):
            detok = IncrementalDetokenizer(tokenizer, shown=ids[:cut])
            assert shown + "".join(detok.push(i) for i in ids[cut:]) == text, cut


def test_a_reply_that_opens_as_another_speaker_is_stopped() -> None:
    """The line break before a reply belongs to the prompt; the impersonation stop "\\nBob:" still sees it."""
    fresh = GenerationRequest("r", [], stop=["\nBob:", "\nAlice:"]).stop_matcher()
    assert fresh.feed("Bo") == ("", False)  # may open "\nBob:": held
    assert fresh.feed("b: I think so") == ("", True)
    resumed = GenerationRequest("r", [], stop=["\nBob:"], assistant_prefix="Sure.\n").stop_matcher()
    assert resumed.feed("Bob: me too") == ("", True)
    short = GenerationRequest("r", [], stop=["<END OF SCENE>"], assistant_prefix="ok <END OF").stop_matcher()
    assert short.feed(" SCENE> more") == ("", True)  # a prefix shorter than the longest stop is context whole
    plain = GenerationRequest("r", [], stop=["\nBob:"]).stop_matcher()
    assert plain.feed("Bobby: hi") == ("Bobby: hi", False)
    assert plain.feed(" and Bob: no") == (" and Bob: no", False)  # not at a line start


def test_stop_matcher_trims_and_holds_back() -> None:
    stops = StopMatcher(["\nAlice:", "<END>"])
    assert stops.feed("Hello") == ("Hello", False)
    assert stops.feed(" there\nAl") == (" there", False)  # "\nAl" may start a stop: held
    assert stops.feed("ready said") == ("\nAlready said", False)  # it did not
    assert stops.feed(" bye <E") == (" bye ", False)
    assert stops.feed("ND> ignored") == ("", True)
    tail = StopMatcher(["###"])
    assert tail.feed("end #") == ("end ", False)
    assert tail.flush() == "#"


def test_sampling_filters_per_row() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, 1.0]] * 4)
    rows = sample_next(
        logits,
        temperature=torch.tensor([0.0, 1.0, 1.0, 1.0]),
        top_k=torch.tensor([0, 1, 0, 0]),
        top_p=torch.tensor([1.0, 1.0, 1e-6, 1.0]),
    )
    assert rows[:3].tolist() == [1, 1, 1]  # greedy, top_k=1 and a tiny top_p all keep only the best
    draws = {int(sample_next(logits[3:], temperature=torch.tensor([1.0]), top_k=torch.tensor([0]),
                             top_p=torch.tensor([1.0]))) for _ in range(200)}
    assert {1, 2} <= draws  # a real draw, not argmax
    seen = torch.tensor([[False, True, False, False]])
    penalized = apply_repetition_penalty(logits[:1], seen, torch.tensor([2.0]))
    assert torch.allclose(penalized[0], torch.tensor([0.0, 2.5, 4.9, 1.0]))


def test_prefix_cache_longest_match_supersede_and_cap() -> None:
    def entry(ids: list[int]) -> PrefixEntry:
        kv = [torch.zeros(1, len(ids), 2)]
        return PrefixEntry(torch.tensor(ids), kv, [t.clone() for t in kv])

    assert common_prefix(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2
    cache = PrefixCache(max_bytes=entry([0] * 10).nbytes * 2)
    cache.store(entry([1, 2, 3]))
    cache.store(entry([1, 2, 3, 4, 5]))  # extends the first: it replaces it
    assert len(cache) == 1
    cache.store(entry([9, 9]))
    found, shared = cache.lookup(torch.tensor([1, 2, 3, 4, 7]))
    assert found is not None and shared == 4
    cache.store(entry([7] * 14))  # over the cap: the least recently used entry ([9, 9]) goes
    assert cache.lookup(torch.tensor([9, 9]))[1] == 0
    assert cache.lookup(torch.tensor([1, 2, 3]))[1] == 3
    assert cache.bytes <= cache.max_bytes


def test_a_padded_prefill_group_matches_separate_forwards(loaded: tuple[Any, Any]) -> None:
    """Prompts of different lengths, one already part-cached, prefilled in one left-padded forward:
    each row's next-token logits equal transformers' own forward of that prompt alone, and its slot
    holds the same K/V as a prefill of that prompt alone."""
    tokenizer, model = loaded
    config, cpu = model.config, torch.device("cpu")
    prompts = [
        tokenizer.encode(text)
        for text in ("Hello there, dragon.", "A much longer prompt about tea and alchemy, told slowly.", "Hi")
    ]

    def slots() -> SlotKV:
        return SlotKV(
            layers=config.num_hidden_layers, slots=3, kv_heads=config.num_key_value_heads, max_len=64,
            head_dim=config.hidden_size // config.num_attention_heads, dtype=torch.float32, device=cpu,
        )

    def prefill(kv: SlotKV, first: int, rows: list[list[int]], starts: list[int]) -> torch.Tensor:
        lengths = [len(row) - start for row, start in zip(rows, starts, strict=True)]
        q = max(lengths)
        tokens = torch.tensor([[0] * (q - n) + row[-n:] for row, n in zip(rows, lengths, strict=True)])
        positions = prefill_positions(starts, lengths, cpu)
        cache = PrefillCache(kv, first, starts, lengths)
        with torch.no_grad():
            out = model(input_ids=tokens, position_ids=positions, attention_mask=causal_mask(positions, cache.kv_len, None),
                        cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    together = slots()
    prefill(together, 0, [prompts[0][:5]], [0])  # row 0's first five tokens came from the prefix cache
    logits = prefill(together, 0, prompts, [5, 0, 0])
    for row, ids in enumerate(prompts):
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(logits[row], expected, atol=1e-4)
        alone = slots()
        prefill(alone, row, [ids], [0])
        for layer in range(config.num_hidden_layers):
            for mine, theirs in ((together.keys, alone.keys), (together.values, alone.values)):
                assert torch.allclose(mine[layer][row, :, : len(ids)], theirs[layer][row, :, : len(ids)], atol=1e-5)


def test_a_padded_decode_bucket_matches_the_exact_step(loaded: tuple[Any, Any]) -> None:
    """Three rows padded to a bucket of four: the real rows' logits and K/V equal an exact step's, and
    the padding row leaves its slot (here one being prefilled) untouched below the last position."""
    _, model = loaded
    config = model.config
    torch.manual_seed(3)

    def slots() -> SlotKV:
        kv = SlotKV(
            layers=config.num_hidden_layers, slots=4, kv_heads=config.num_key_value_heads, max_len=300,
            head_dim=config.hidden_size // config.num_attention_heads, dtype=torch.float32, device=torch.device("cpu"),
        )
        for buf in (*kv.keys, *kv.values):
            buf.copy_(torch.randn_like(buf))  # any cached history: the step must read it the same way
        return kv

    exact_kv, padded_kv = slots(), slots()
    for mine, theirs in zip((*padded_kv.keys, *padded_kv.values), (*exact_kv.keys, *exact_kv.values), strict=True):
        mine.copy_(theirs)
    before = [buf[3].clone() for buf in padded_kv.keys]
    tokens, positions = [5, 17, 42], [7, 120, 31]
    graphs = DecodeGraphs(model, padded_kv, Attention(), capture=False)
    assert graphs.bucket(3, 121) == (4, 256)
    with torch.no_grad():
        padded = graphs.logits(tokens, positions)
        exact = decode_logits(model, exact_kv, torch.tensor(tokens).unsqueeze(-1), torch.tensor(positions), 121, Attention())
    assert padded.shape == exact.shape == (3, model.config.vocab_size)
    assert torch.allclose(padded, exact, atol=1e-4)
    for mine, theirs in zip((*padded_kv.keys, *padded_kv.values), (*exact_kv.keys, *exact_kv.values), strict=True):
        assert torch.allclose(mine[:3], theirs[:3], atol=1e-5)
    for layer, old in enumerate(before):
        assert torch.equal(padded_kv.keys[layer][3, :, : graphs.pad_position], old[:, : graphs.pad_position])


def test_a_padding_row_is_never_masked_whole_under_a_sliding_window(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A padding row queries the last position; with a 16-token window none of the 256 keys in view is
    near it. It must still see one key: a fully masked row can come back NaN from SDPA on a GPU."""
    _, model = loaded
    config = model.config
    kv = SlotKV(
        layers=config.num_hidden_layers, slots=4, kv_heads=config.num_key_value_heads, max_len=300,
        head_dim=config.hidden_size // config.num_attention_heads, dtype=torch.float32, device=torch.device("cpu"),
    )
    masks: list[torch.Tensor] = []
    forward = model.forward

    def spying_forward(*args: Any, **kwargs: Any) -> Any:
        masks.append(kwargs["attention_mask"].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spying_forward)
    with torch.no_grad():
        DecodeGraphs(model, kv, Attention(16), capture=False).logits([5, 6, 7], [20, 21, 22])
    (mask,) = masks
    assert mask.shape == (4, 1, 1, 256)
    assert bool(mask.any(dim=-1).all())
    assert mask[:3, 0, 0].sum(dim=-1).tolist() == [16, 16, 16]  # real rows: exactly their window


async def test_after_a_failed_capture_decode_steps_are_exact_again(
    loaded: tuple[Any, Any], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer, model = loaded
    settings = Settings(model=str(tiny_model_dir), device="cpu", max_batch_size=4, context_tokens=1024)
    engine = TransformersEngine(settings, model=model, tokenizer=tokenizer, cuda_graphs=True)
    await engine.start()
    assert engine.graphs is not None
    engine.graphs.failed = True  # what a capture that raised leaves behind
    decode_rows: list[int] = []
    forward = model.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[1] == 1:
            decode_rows.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    try:
        await asyncio.gather(*(engine.generate_text(GenerationRequest(f"f{i}", chat(f"Hi {i}"), GREEDY)) for i in range(3)))
    finally:
        await engine.close()
    assert decode_rows and max(decode_rows) == 3  # never padded to the bucket of 4


def test_decode_buckets_are_powers_of_two_rows_and_kv_blocks(loaded: tuple[Any, Any]) -> None:
    _, model = loaded
    kv = SlotKV(layers=1, slots=6, kv_heads=1, max_len=4096, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    graphs = DecodeGraphs(model, kv, Attention(), capture=False)
    assert [graphs.bucket(rows, 1)[0] for rows in range(1, 7)] == [1, 2, 4, 4, 6, 6]  # capped at the slots
    assert [graphs.bucket(1, n)[1] for n in (1, KV_BLOCK, KV_BLOCK + 1, 4000, 4096)] == [
        KV_BLOCK, KV_BLOCK, 2 * KV_BLOCK, 4096, 4096]


def test_which_layers_a_sliding_window_applies_to() -> None:
    def of(**fields: Any) -> Attention:
        return Attention.of(SimpleNamespace(**fields))

    assert of(sliding_window=None) == Attention()
    assert of(sliding_window=4096) == Attention(4096)  # Mistral: every layer, no layer_types
    assert of(sliding_window=16, layer_types=["full_attention"] * 2) == Attention()  # named, unused
    assert of(sliding_window=16, layer_types=["sliding_attention", "full_attention"]) == Attention(16, mixed=True)
    with pytest.raises(ValueError, match=r"\['chunked_attention'\] are not supported"):
        of(sliding_window=16, layer_types=["chunked_attention", "full_attention"])
    masks = Attention(2, mixed=True).masks(torch.tensor([[3]]), 4)
    assert isinstance(masks, dict) and masks["full_attention"].sum() == 4 and masks["sliding_attention"].sum() == 2


@pytest.mark.parametrize("graph_buckets", [False, True], ids=["eager-decode", "graph-buckets"])
async def test_full_attention_layers_see_past_a_sliding_window(graph_buckets: bool) -> None:
    """Gemma 3 alternates windowed and full-attention layers. One windowed mask for the whole model blinded
    the full-attention layers past the window: every reply to a prompt over 16 tokens differed from generate()."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tokenizer = build_tokenizer(model_max_length=1024)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    settings = Settings(device="cpu", max_batch_size=2, context_tokens=1024)
    engine = TransformersEngine(settings, model=model, tokenizer=tokenizer, cuda_graphs=graph_buckets)
    await engine.start()
    try:
        prompts = [chat("Once upon a time, in a land far away, there lived a dragon. " * 3), chat("Hi there.")]
        outs = await asyncio.gather(*(engine.generate_text(GenerationRequest(f"s{i}", p, GREEDY)) for i, p in enumerate(prompts)))
        for prompt, (text, _) in zip(prompts, outs, strict=True):
            assert text == reference(engine, prompt, 24)
    finally:
        await engine.close()


# --- the engine -------------------------------------------------------------------------------


async def test_concurrent_requests_match_one_at_a_time_generate(engine: TransformersEngine) -> None:
    prompts = [chat(f"Hello number {i}. " * (i + 1)) for i in range(7)]  # more than max_batch_size=4
    outs = await asyncio.gather(
        *(engine.generate_text(GenerationRequest(f"r{i}", p, GREEDY)) for i, p in enumerate(prompts))
    )
    for prompt, (text, finish) in zip(prompts, outs, strict=True):
        assert text == reference(engine, prompt, 24)
        assert finish.completion_tokens >= 1 and finish.prompt_tokens > 10
        assert finish.reason in ("length", "stop")
    assert engine.running == 0


@pytest.mark.skipif(batched_linear.unavailable_reason() is not None, reason="the CPU kernel cannot run here")
async def test_decode_batches_of_ten_rows_or_more_go_through_the_cpu_kernel_and_match_generate(
    loaded: tuple[Any, Any], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer, model = loaded
    real = batched_linear.kernel()
    assert real is not None
    rows_seen: list[int] = []

    def counting(*args: int) -> int:
        rows_seen.append(args[3])
        return real(*args)

    monkeypatch.setattr(batched_linear, "kernel", lambda: counting)
    threads = torch.get_num_threads()
    settings = Settings(model=str(tiny_model_dir), device="cpu", max_batch_size=12, context_tokens=1024, cpu_threads=2)
    eng = TransformersEngine(settings, model=model, tokenizer=tokenizer)
    await eng.start()
    try:
        prompts = [chat(f"Tell me about the number {i}.") for i in range(12)]
        outs = await asyncio.gather(
            *(eng.generate_text(GenerationRequest(f"k{i}", p, GREEDY)) for i, p in enumerate(prompts))
        )
    finally:
        await eng.close()
        monkeypatch.undo()
        batched_linear.install(model, 1)  # the real kernel again, for the module's other engines
        torch.set_num_threads(threads)
    assert 12 in rows_seen  # a decode step of all twelve (prefills of up to MAX_ROWS rows may come too)
    for prompt, (text, _) in zip(prompts, outs, strict=True):
        assert text == reference(eng, prompt, 24)


async def test_a_burst_of_requests_is_prefilled_together(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefill_rows: list[int] = []
    forward = engine.model.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[1] > 1:
            prefill_rows.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counting_forward)
    # max_batch_size=4; a persona each: a shared one is first prefilled alone (see the test after this one)
    prompts = [chat(f"Channel {i} says hello to the dragon.", f"{name} is the dragon's friend.")
               for i, name in enumerate(("Ada", "Bo", "Cy", "Di"))]
    outs = await asyncio.gather(
        *(engine.generate_text(GenerationRequest(f"b{i}", p, GREEDY)) for i, p in enumerate(prompts))
    )
    assert sum(prefill_rows) == 4 and len(prefill_rows) <= 2  # one forward (two if the engine woke mid-burst)
    for prompt, (text, _) in zip(prompts, outs, strict=True):
        assert text == reference(engine, prompt, 24)


EMBER = "You are Ember, an old dragon who guards the mountain library and answers in riddles."
BURST = [chat(f"{name} asks about the tea of the east.", EMBER) for name in ("Alpha", "Bravo", "Charlie", "Delta")]


def prompt_ids(messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
    return encode_messages(tokenizer, messages, context_tokens=1024, max_new_tokens=24).ids


def fresh_engine(loaded: tuple[Any, Any], tiny_model_dir: Path, **settings: Any) -> TransformersEngine:
    """A new engine on the module's tiny model: 4 slots, a 1,024-token context, `settings` on top."""
    tokenizer, model = loaded
    fields = dict(model=str(tiny_model_dir), device="cpu", max_batch_size=4, context_tokens=1024) | settings
    return TransformersEngine(Settings(**fields), model=model, tokenizer=tokenizer)


def count_prefilled_tokens(patch: pytest.MonkeyPatch, model: Any) -> list[int]:
    """Patch `model` to record the prompt tokens each prefill forward computes (left padding aside)."""
    forward, computed = model.forward, []

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        if isinstance(kwargs["cache"], PrefillCache):
            computed.append(int((kwargs["input_ids"] != PAD_ID).sum()))
        return forward(*args, **kwargs)

    patch.setattr(model, "forward", counting_forward)
    return computed


async def serve(
    loaded: tuple[Any, Any], tiny_model_dir: Path, bursts: list[list[list[dict[str, str]]]], **settings: Any
) -> tuple[list[str], list[int]]:
    """Greedy replies from a fresh engine (4 slots) to `bursts` of prompts, one burst after the other, and the
    prompt tokens each prefill forward computed (left padding aside), counted at the model. A burst arrives
    whole, as when channels talk at once: the engine thread's look at its inbox waits until all of it is there
    (else it may start on the first prompt before the prompt thread has handed over the others)."""
    engine = fresh_engine(loaded, tiny_model_dir, **settings)
    prepare, take_new = engine._prepare_for_engine, engine._take_new
    burst_in, expected = threading.Event(), 0

    def prepare_then_check(stream: GenerationStream) -> None:  # the prompt thread
        prepare(stream)
        if len(engine._inbox) == expected:
            burst_in.set()

    def take_new_once_the_burst_is_in() -> None:  # the engine thread
        burst_in.wait(30)
        take_new()

    texts: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        computed = count_prefilled_tokens(patch, engine.model)
        patch.setattr(engine, "_prepare_for_engine", prepare_then_check)
        patch.setattr(engine, "_take_new", take_new_once_the_burst_is_in)
        await engine.start()
        try:
            for burst in bursts:
                expected = len(burst)
                burst_in.clear()
                outs = await asyncio.gather(*(engine.generate_text(GenerationRequest(f"r{len(texts) + i}", p, GREEDY))
                                              for i, p in enumerate(burst)))
                assert burst_in.is_set()
                texts += [text for text, _ in outs]
        finally:
            await engine.close()
    return texts, computed


async def test_a_burst_on_one_system_prompt_prefills_it_once(loaded: tuple[Any, Any], tiny_model_dir: Path) -> None:
    """Channels talking to one persona at once, on a fresh engine: the prefix cache only holds finished turns,
    so each of them prefilled the persona's system prompt again. Now it is prefilled once, alone, and each
    copies it from the prefix cache: the same replies for about half the prompt tokens."""
    ids = [prompt_ids(p, loaded[0]) for p in BURST]
    shared = common_prefix(torch.tensor(ids[0]), torch.tensor(ids[1]))
    assert all(common_prefix(torch.tensor(ids[0]), torch.tensor(other)) == shared for other in ids[1:])
    assert MIN_SHARED_PREFIX <= shared < min(map(len, ids)) - 1 and not any(PAD_ID in i for i in ids)
    alone, computed_alone = await serve(loaded, tiny_model_dir, [[p] for p in BURST], prefix_cache_mb=0)
    assert computed_alone == [len(i) for i in ids]
    together, computed = await serve(loaded, tiny_model_dir, [BURST])
    assert together == alone
    assert computed == [shared, sum(len(i) - shared for i in ids)]  # 56 + 4 x 31 tokens, not 4 x 87


async def test_a_long_shared_prefix_is_prefilled_a_chunk_a_step(
    loaded: tuple[Any, Any], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared prefix longer than PREFILL_CHUNK in one forward would stall the replies being decoded; it goes
    in chunks, each continuing from what the prefix cache holds. The rest under MIN_SHARED_PREFIX is the first
    request's own; the others then copy the whole shared prefix from its slot."""
    monkeypatch.setattr(transformers_engine, "PREFILL_CHUNK", 24)
    ids = [prompt_ids(p, loaded[0]) for p in BURST]
    shared = common_prefix(torch.tensor(ids[0]), torch.tensor(ids[1]))
    alone, _ = await serve(loaded, tiny_model_dir, [[p] for p in BURST], prefix_cache_mb=0)
    together, computed = await serve(loaded, tiny_model_dir, [BURST])
    assert together == alone
    assert computed[:3] == [24, 24, len(ids[0]) - 48]  # 56 shared: 8 left over for the first
    assert sum(computed[3:]) == sum(len(i) - shared for i in ids[1:])


async def test_a_burst_prefills_a_prefix_alone_only_for_the_prefix_cache_to_gain_it(
    loaded: tuple[Any, Any], tiny_model_dir: Path
) -> None:
    """No forward of its own for a shared prefix the prefix cache cannot keep (it would be lost), for one
    under MIN_SHARED_PREFIX tokens (a persona each), nor for one the cache already holds (a later burst)."""
    tokenizer = loaded[0]
    lengths = [len(prompt_ids(p, tokenizer)) for p in BURST]
    alone, _ = await serve(loaded, tiny_model_dir, [[p] for p in BURST], prefix_cache_mb=0)
    assert await serve(loaded, tiny_model_dir, [BURST], prefix_cache_mb=0) == (alone, [sum(lengths)])

    own = [chat("Hello, dragon.", f"{name} is the dragon's friend.") for name in ("Ada", "Bo", "Cy", "Di")]
    own_ids = [torch.tensor(prompt_ids(p, tokenizer)) for p in own]
    assert max(common_prefix(own_ids[0], other) for other in own_ids[1:]) < MIN_SHARED_PREFIX
    _, computed = await serve(loaded, tiny_model_dir, [own])
    assert computed == [sum(len(i) for i in own_ids)]

    earlier = chat("Echo asks about the tea of the east.", EMBER)
    shared = common_prefix(torch.tensor(prompt_ids(earlier, tokenizer)), torch.tensor(prompt_ids(BURST[0], tokenizer)))
    texts, computed = await serve(loaded, tiny_model_dir, [[earlier], BURST])
    assert texts[1:] == alone
    assert computed == [len(prompt_ids(earlier, tokenizer)), sum(n - shared for n in lengths)]


async def test_a_prompt_arriving_while_another_runs_copies_their_shared_prefix_from_its_slot(
    loaded: tuple[Any, Any], tiny_model_dir: Path
) -> None:
    """Channels that start a step apart: the first one's system prompt is in its slot long before it finishes
    (only then does the prefix cache get it), so the later one copies it from there, even with no prefix cache."""
    first, later = BURST[0], BURST[1]
    ids = [prompt_ids(p, loaded[0]) for p in (first, later)]
    shared = common_prefix(torch.tensor(ids[0]), torch.tensor(ids[1]))
    (first_alone, later_alone), _ = await serve(loaded, tiny_model_dir, [[first], [later]], prefix_cache_mb=0)
    engine = fresh_engine(loaded, tiny_model_dir, prefix_cache_mb=0)
    prepare, decode = engine._prepare_for_engine, engine._decode_step
    later_in = threading.Event()

    def prepare_then_signal(stream: GenerationStream) -> None:  # the prompt thread
        prepare(stream)
        if stream.request.request_id == "later":
            later_in.set()

    def decode_once_the_later_one_is_in() -> None:  # the first request cannot finish before the later one comes
        later_in.wait(30)
        decode()

    with pytest.MonkeyPatch.context() as patch:
        computed = count_prefilled_tokens(patch, engine.model)
        patch.setattr(engine, "_prepare_for_engine", prepare_then_signal)
        patch.setattr(engine, "_decode_step", decode_once_the_later_one_is_in)
        await engine.start()
        try:
            stream = engine.submit(GenerationRequest("first", first, GREEDY))
            items = aiter(stream)
            head = await anext(items)  # its prompt is prefilled: it is running
            later_text, _ = await engine.generate_text(GenerationRequest("later", later, GREEDY))
            rest = [item async for item in items]
        finally:
            await engine.close()
    first_text = "".join(item.text for item in (head, *rest) if isinstance(item, TextChunk))
    assert (first_text, later_text) == (first_alone, later_alone)
    assert computed == [len(ids[0]), len(ids[1]) - shared]


async def test_a_new_request_gets_its_first_text_before_the_next_decode_step(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With others decoding, a newcomer's first token must not wait a whole batch step to be shown."""
    held_back: list[str] = []
    decode_step = engine._decode_step

    def checking_decode_step() -> None:
        held_back.extend(r.stream.request.request_id for r in engine._running if r.generated == 1 and r.out)
        decode_step()

    monkeypatch.setattr(engine, "_decode_step", checking_decode_step)
    first = asyncio.create_task(engine.generate_text(GenerationRequest("early", chat("Tell a long story."), GREEDY)))
    await asyncio.sleep(0.05)  # decoding by now
    late, _ = await engine.generate_text(GenerationRequest("late", chat("Hello there, dragon."), GREEDY))
    await first
    assert late and held_back == []


async def test_prefix_reuse_gives_the_same_reply(engine: TransformersEngine) -> None:
    long_history = chat("Once upon a time, in a land far away, there lived a dragon. " * 12)
    first, _ = await engine.generate_text(GenerationRequest("a", long_history, GREEDY))
    assert len(engine.prefixes) == 1
    follow_up = [*long_history, {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    ids = torch.tensor(encode_messages(engine.tokenizer, follow_up, context_tokens=1024, max_new_tokens=24).ids)
    shared = engine.prefixes.lookup(ids)[1]
    assert shared > 100  # the whole first turn is reusable
    second, _ = await engine.generate_text(GenerationRequest("b", follow_up, GREEDY))
    assert second == reference(engine, follow_up, 24)


async def test_stop_string_is_trimmed(engine: TransformersEngine) -> None:
    prompt = chat("Tell me a story about tea.")
    full, _ = await engine.generate_text(GenerationRequest("full", prompt, GREEDY))
    stop = full[8:11]
    assert len(stop) == 3 and full.find(stop) == 8
    text, finish = await engine.generate_text(GenerationRequest("stopped", prompt, GREEDY, stop=[stop]))
    assert (text, finish.reason) == (full[:8], "stop")


async def test_cancel_and_streaming(engine: TransformersEngine) -> None:
    long = Sampling(temperature=0.8, max_new_tokens=500)
    stream = engine.submit(GenerationRequest("c", chat("Go on forever."), long))
    items = []
    async for item in stream:
        items.append(item)
        if isinstance(item, TextChunk) and len(items) == 3:
            stream.cancel()
    assert isinstance(items[-1], Finish) and items[-1].reason == "cancelled"
    assert items[-1].completion_tokens < 500
    assert all(isinstance(i, TextChunk) and i.text for i in items[:-1])


async def test_resume_continues_after_the_assistant_prefix(engine: TransformersEngine) -> None:
    prompt = chat("Say something.")
    full, _ = await engine.generate_text(GenerationRequest("full", prompt, GREEDY))
    cut = len(full) // 2
    rest, finish = await engine.generate_text(GenerationRequest("resumed", prompt, GREEDY, assistant_prefix=full[:cut]))
    assert rest  # the continuation is new text after the prefix, not a restart
    assert not (full[:cut] and rest.startswith(full[:cut]))
    written = len(engine.tokenizer(full[:cut], add_special_tokens=False)["input_ids"])
    assert 0 < finish.completion_tokens <= GREEDY.max_new_tokens - written  # the limit counts what was written


async def test_a_resumed_reply_that_has_all_its_tokens_ends_at_once(engine: TransformersEngine) -> None:
    written = "and so on " * 20  # more tokens than GREEDY's 24
    text, finish = await engine.generate_text(GenerationRequest("done", chat("Go on."), GREEDY, assistant_prefix=written))
    assert (text, finish.reason, finish.completion_tokens) == ("", "length", 0)
    # So does one whose written text fills the context (a persona whose max_new_tokens reach its end).
    long_budget = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=4000)
    full = GenerationRequest("full", chat("Go on."), long_budget, assistant_prefix="and so on " * 400)
    text, finish = await engine.generate_text(full)
    assert (text, finish.reason, finish.completion_tokens) == ("", "length", 0)


def test_a_resumed_reply_keeps_the_space_before_its_first_new_word() -> None:
    """SentencePiece decoders drop the space of a text's first token: decoded alone, "▁world" is "world"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"▁Hello": 0, "▁world": 1, "<unk>": 2}, unk_token="<unk>"))
    words.pre_tokenizer, words.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    assert IncrementalDetokenizer(tokenizer).push(1) == "world"
    assert IncrementalDetokenizer(tokenizer, shown=[0]).push(1) == " world"


def test_slots_are_what_the_free_memory_holds() -> None:
    gib = 1024**3
    assert slots_that_fit(32, gib, None) == 32  # unknown: as asked
    assert slots_that_fit(32, gib, 100 * gib) == 32
    assert slots_that_fit(32, gib, 20 * gib) == 16  # KV_SHARE of it
    assert slots_that_fit(32, gib, 20 * gib, reserved=10 * gib) == 8
    assert slots_that_fit(32, gib, gib) == 0
    assert slot_bytes(layers=32, kv_heads=8, max_len=8192, head_dim=128, dtype=torch.bfloat16) == gib


async def test_an_engine_serves_as_many_at_once_as_memory_holds_and_says_so(
    loaded: tuple[Any, Any], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer, model = loaded
    settings = Settings(model=str(tiny_model_dir), device="cpu", max_batch_size=8, context_tokens=1024, prefix_cache_mb=0)
    config = model.config
    per_slot = slot_bytes(layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads, max_len=1024,
                          head_dim=config.hidden_size // config.num_attention_heads, dtype=torch.float32)
    monkeypatch.setattr(transformers_engine, "free_memory", lambda device: int(3.5 * per_slot / KV_SHARE))
    eng = TransformersEngine(settings, model=model, tokenizer=tokenizer)
    with caplog.at_level(logging.WARNING, logger=transformers_engine.__name__):
        await eng.start()
    try:
        assert eng.kv.slots == 3
        assert "8 conversations x 1024 tokens need" in caplog.text and "generating for 3 at once" in caplog.text
        prompts = [chat(f"Count to {i}.") for i in range(5)]  # more than the slots: the rest wait their turn
        outs = await asyncio.gather(
            *(eng.generate_text(GenerationRequest(f"m{i}", p, GREEDY)) for i, p in enumerate(prompts))
        )
        assert all(finish.completion_tokens >= 1 for _, finish in outs)
    finally:
        await eng.close()
    monkeypatch.setattr(transformers_engine, "free_memory", lambda device: per_slot // 2)
    starved = TransformersEngine(settings, model=model, tokenizer=tokenizer)
    with pytest.raises(EngineError, match="one conversation of 1024 tokens needs .* lower HERMES_CONTEXT_TOKENS"):
        await starved.start()
    await starved.close()


async def test_prompt_too_long_is_a_clear_error(engine: TransformersEngine) -> None:
    huge = Sampling(max_new_tokens=100)
    too_long = [{"role": "system", "content": "rule " * 2000}, {"role": "user", "content": "hi"}]
    with pytest.raises(EngineError, match="system prompt alone"):
        await engine.generate_text(GenerationRequest("x", too_long, huge))


async def test_a_prompt_the_chat_template_refuses_fails_alone(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some models' templates raise for message orders they do not accept (Mistral's, Gemma's): that request
    gets an error, and it is not lost from the engine (its stream would wait forever, and shutdown with it)."""
    encode = transformers_engine.encode_messages

    def picky(tokenizer: Any, messages: list[dict[str, str]], **kw: Any) -> Any:
        if messages[-1]["content"] == "refused":
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        return encode(tokenizer, messages, **kw)

    monkeypatch.setattr(transformers_engine, "encode_messages", picky)
    async with asyncio.timeout(60):  # a lost request never answers: fail, don't hang
        refused, fine = await asyncio.gather(
            engine.generate_text(GenerationRequest("bad", chat("refused"), GREEDY)),
            engine.generate_text(GenerationRequest("good", chat("Hello there"), GREEDY)),
            return_exceptions=True,
        )
    assert isinstance(refused, EngineError) and "roles must alternate" in str(refused)
    assert fine[0] == reference(engine, chat("Hello there"), 24)


async def test_a_prompt_being_encoded_holds_up_no_reply_being_written(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fitting a long history renders the chat template several times (50-100 ms at 8k tokens, seconds at
    32k): on the engine thread every reply being written stood still meanwhile."""
    encode = transformers_engine.encode_messages
    encoding, release, threads = threading.Event(), threading.Event(), []

    def slow_for_one(tokenizer: Any, messages: list[dict[str, str]], **kw: Any) -> Any:
        if messages[-1]["content"] == "a very long history":
            threads.append(threading.current_thread().name)
            encoding.set()
            release.wait(30)
        return encode(tokenizer, messages, **kw)

    monkeypatch.setattr(transformers_engine, "encode_messages", slow_for_one)
    long_reply = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=400)
    story = engine.submit(GenerationRequest("story", chat("Tell a long story."), long_reply))
    items = aiter(story)
    first = await anext(items)
    held = engine.submit(GenerationRequest("held", chat("a very long history"), GREEDY))
    try:
        assert await asyncio.to_thread(encoding.wait, 10)
        async with asyncio.timeout(20):  # 400 tokens take about a second here
            rest = [item async for item in items]  # the story goes on to its end meanwhile
        assert not release.is_set()
        assert isinstance(first, TextChunk) and isinstance(rest[-1], Finish) and rest[-1].reason == "length"
    finally:
        release.set()
    text = "".join([item.text async for item in held if isinstance(item, TextChunk)])
    assert text == reference(engine, chat("a very long history"), 24)
    assert threads and threads[0] != "hermes-engine"


async def test_a_request_cancelled_while_it_waits_to_be_encoded_is_not_encoded(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply superseded while a long prompt ahead of it is encoded: encoding its own (seconds at 32k tokens)
    would be wasted work that holds up the prompts after it. It ends with its cancel reason when its turn comes,
    as a cancelled request that waits for a slot does (nothing generated)."""
    encode = transformers_engine.encode_messages
    encoding, release, encoded = threading.Event(), threading.Event(), []

    def slow_for_one(tokenizer: Any, messages: list[dict[str, str]], **kw: Any) -> Any:
        encoded.append(messages[-1]["content"])
        if messages[-1]["content"] == "a very long history":
            encoding.set()
            release.wait(30)
        return encode(tokenizer, messages, **kw)

    monkeypatch.setattr(transformers_engine, "encode_messages", slow_for_one)
    ahead = engine.submit(GenerationRequest("ahead", chat("a very long history"), GREEDY))
    try:
        assert await asyncio.to_thread(encoding.wait, 10)
        superseded = engine.submit(GenerationRequest("superseded", chat("Hello there"), GREEDY))
        superseded.cancel("released")
    finally:
        release.set()
    async with asyncio.timeout(20):
        items = [item async for item in superseded]
        rest = [item async for item in ahead]
    assert items == [Finish("released")]
    assert encoded == ["a very long history"]
    assert isinstance(rest[-1], Finish)  # the request ahead is served as ever


async def test_the_thread_that_encodes_prompts_holds_no_process_open(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that crashes before `close()`: a ThreadPoolExecutor's thread (not a daemon, joined at exit) kept
    the process alive until every queued prompt was encoded (8 s after the crash for five slow ones)."""
    encode, threads = transformers_engine.encode_messages, []

    def recording(tokenizer: Any, messages: list[dict[str, str]], **kw: Any) -> Any:
        threads.append(threading.current_thread())
        return encode(tokenizer, messages, **kw)

    monkeypatch.setattr(transformers_engine, "encode_messages", recording)
    async with asyncio.timeout(20):
        await engine.generate_text(GenerationRequest("r", chat("Hello there"), GREEDY))
    assert threads and all(thread.daemon for thread in threads)


async def test_a_request_still_being_encoded_at_shutdown_gets_an_error(
    loaded: tuple[Any, Any], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stream must end: a worker waiting on it would never finish shutting down."""
    tokenizer, model = loaded
    eng = TransformersEngine(Settings(model=str(tiny_model_dir), device="cpu", max_batch_size=2), model=model,
                             tokenizer=tokenizer)
    await eng.start()
    encode, encoding = transformers_engine.encode_messages, threading.Event()

    def slow(tokenizer: Any, messages: list[dict[str, str]], **kw: Any) -> Any:
        encoding.set()
        time.sleep(0.3)
        return encode(tokenizer, messages, **kw)

    monkeypatch.setattr(transformers_engine, "encode_messages", slow)
    streams = [eng.submit(GenerationRequest(f"r{i}", chat("Hello"), GREEDY)) for i in range(2)]
    assert await asyncio.to_thread(encoding.wait, 10)
    await eng.close()
    for stream in streams:
        with pytest.raises(EngineError, match="shutting down"):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass


def test_a_hub_model_on_the_cpu_warns_before_it_downloads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import huggingface_hub.constants

    # This machine has no hub: offline mode makes the load fail at once, after the warning. The hub reads
    # HF_HUB_OFFLINE when it is imported, so the flag itself is set for this test.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EngineError, match="cannot load HERMES_MODEL='teknium/OpenHermes-2.5-Mistral-7B'"):
        load_model(Settings(model="teknium/OpenHermes-2.5-Mistral-7B", device="cpu"))
    assert "no GPU: HERMES_MODEL=teknium/OpenHermes-2.5-Mistral-7B will run on the CPU in float32" in caplog.text
    assert "HERMES_ENGINE=openai" in caplog.text


def test_a_local_model_on_the_cpu_loads_without_the_warning(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_model(Settings(model=str(tiny_model_dir), device="cpu"))
    assert "no GPU" not in caplog.text


def test_a_model_without_sdpa_attention_is_a_clear_error(tmp_path: Path) -> None:
    """The engine passes boolean masks, which only SDPA attention reads right; Gemma 2 in transformers 5.24
    has none, and its loader's ValueError ended `hermes-bot worker` in a traceback."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = build_tokenizer(model_max_length=256)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(EngineError, match="cannot run in this engine: .*scaled_dot_product_attention"):
        load_model(Settings(model=str(tmp_path), device="cpu"))


async def test_a_stream_hands_over_everything_waiting_as_one_batch() -> None:
    stream = GenerationStream(GenerationRequest("b", chat("hi"), GREEDY))
    stream.feed([TextChunk("a"), TextChunk("b")])
    stream.feed([TextChunk("c"), Finish("stop", 1, 3)])
    assert [batch async for batch in stream.batches()] == [[TextChunk("a"), TextChunk("b"), TextChunk("c"),
                                                          Finish("stop", 1, 3)]]
    failing = GenerationStream(GenerationRequest("f", chat("hi"), GREEDY))
    failing.feed([TextChunk("x"), EngineError("boom"), TextChunk("never")])
    batches = failing.batches()
    assert await anext(batches) == [TextChunk("x")]  # what came before the error is still delivered
    with pytest.raises(EngineError, match="boom"):
        await anext(batches)


def test_a_process_stopping_while_the_model_loads_does_not_wait_for_the_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal or a refused token during a minutes-long load: `asyncio.run` must return at once, not
    join the loading thread (as it joins `asyncio.to_thread`'s) and leave the process hanging."""
    loading, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow_load(settings: Settings) -> tuple[object, object, object]:
        loading.set()
        release.wait(10)
        finished.set()
        raise EngineError("gave up")

    monkeypatch.setattr(transformers_engine, "load_model", slow_load)

    async def start_then_stop() -> None:
        start = asyncio.create_task(TransformersEngine(Settings(device="cpu")).start())
        await asyncio.to_thread(loading.wait, 10)
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start

    try:
        asyncio.run(start_then_stop())
        assert loading.is_set() and not finished.is_set()  # returned while the load still ran
    finally:
        release.set()


def test_a_model_path_that_holds_no_model_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers took a missing folder for a malformed hub id ("Repo id must use alphanumeric chars"), after
    the no-GPU warning meant for a download, and an empty one for a model that needs sentencepiece."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    for model, problem in [("./tiny-mdl", "no such directory"), ("../tiny-mdl", "no such directory"),
                           (str(tmp_path / "tiny-mdl"), "no such directory"), ("~/no-such-hermes-model", "no such directory"),
                           ("empty", "holds no model (no config.json)"), ("weights.gguf", "not a directory")]:
        with pytest.raises(EngineError) as raised:
            load_model(Settings(model=model, device="cpu"))
        assert str(raised.value) == f"HERMES_MODEL {model}: {problem}"
    assert "no GPU" not in caplog.text


def test_a_model_path_under_home_is_expanded(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    """`HERMES_MODEL=~/models/x` in .env or hermes.yaml, where no shell expands `~`."""
    monkeypatch.setenv("HOME", str(tiny_model_dir.parent))
    tokenizer, model, _ = load_model(Settings(model=f"~/{tiny_model_dir.name}", device="cpu"))
    assert model.config.vocab_size == len(tokenizer)


def test_a_history_longer_than_the_model_is_trimmed_without_transformers_warning(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    """encode_messages encodes the whole history before it trims it to the context: transformers' "Token indices
    sequence length is longer than ... will result in indexing errors" on stderr alarmed for nothing."""
    import logging

    warner = logging.getLogger("transformers.tokenization_utils_base")
    monkeypatch.setattr(warner, "filters", [])  # only what load_model installs counts
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)  # transformers' loggers do not propagate to the root
    try:
        tokenizer, _, _ = load_model(Settings(model=str(tiny_model_dir), device="cpu"))
        history = chat("hello world " * 3000)  # about 6,000 tokens; the tiny model's limit is 4,096
        encoded = encode_messages(tokenizer, history, context_tokens=1024, max_new_tokens=24)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert encoded.truncated_newest and len(encoded.ids) <= 1024
    assert not [r for r in records if "Token indices sequence length" in r.getMessage()]
