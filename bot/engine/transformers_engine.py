"""The local engine: one copy of a transformers causal LM, continuous batching on a dedicated thread.

Why our own decode loop rather than transformers' `init_continuous_batching`: we need per-request
repetition penalty, streaming with stop strings, cancellation between steps, and reuse of the KV of
shared prefixes across requests; with those, the loop is small (see BENCHMARKS.md for the numbers).

Each loop iteration: take new requests, drop cancelled ones, prefill the waiting prompts that fit
one forward (or the next chunk of one long prompt) into free slots, then run ONE batched decode step
for every running request (on a GPU, replayed from a CUDA graph: `decode.py`). Requests join and
leave between steps. After start, all torch work happens on the engine thread; text reaches the
event loop through `GenerationStream.feed_threadsafe`, once per step. Prompts are encoded on a thread
of their own: fitting a long history renders the chat template several times (50-100 ms at 8k tokens,
seconds at 32k), and every reply being written would stand still meanwhile. Both threads are daemons: a
process that ends without `close()` (a crash) is not held open by them (bot/daemon_thread.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bot.config import Settings, local_model_dir
from bot.daemon_thread import in_daemon_thread
from bot.engine import batched_linear
from bot.engine.base import (
    Engine,
    EngineError,
    Finish,
    FinishReason,
    GenerationRequest,
    GenerationStream,
    TextChunk,
)
from bot.engine.batched_linear import MIN_ROWS
from bot.engine.decode import PAD_ID, DecodeGraphs, decode_logits
from bot.engine.hub import cache_only, check_hub_id, offline_hub
from bot.engine.kv import (
    Attention,
    PrefillCache,
    PrefixCache,
    PrefixEntry,
    SlotKV,
    common_prefix,
    free_memory,
    prefill_positions,
    slot_bytes,
    slots_that_fit,
)
from bot.engine.sampling import apply_repetition_penalty, sample_next
from bot.engine.text import IncrementalDetokenizer, StopMatcher
from bot.prompt import PromptTooLong, encode_messages, quiet_overlong_warning

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # prompt tokens (padding included) per step while others decode: keeps their latency flat
MIN_SHARED_PREFIX = 16  # new tokens a burst's common prompt prefix must hold to be prefilled once, on its own


def resolve_device(name: str) -> torch.device:
    """HERMES_DEVICE (its form checked by Settings) as a device this machine has: a GPU it lacks is one EngineError
    here, where torch asserted deep inside the load ("Torch not compiled with CUDA enabled")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "mps" and not torch.backends.mps.is_available():
        why = "this machine or this torch has no Apple GPU"
    elif device.type == "cuda" and (device.index or 0) >= gpus and torch.version.cuda is None:
        why = "this torch is a CPU-only build (README, On a GPU: install the CUDA build)"
    elif device.type == "cuda" and (device.index or 0) >= gpus:
        why = f"{gpus} CUDA GPU{'' if gpus == 1 else 's'} visible (check the driver and CUDA_VISIBLE_DEVICES)"
    else:
        return device
    kind = device.type.upper()
    raise EngineError(f"HERMES_DEVICE={name}: {kind} requested but not available: {why}; or set it to auto or cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(kind: str) -> Any:
    """BitsAndBytesConfig for `bnb-4bit`/`bnb-8bit`; a clear error when bitsandbytes is missing."""
    if kind == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EngineError(
            f"HERMES_QUANTIZATION={kind} needs bitsandbytes (pip install bitsandbytes, CUDA only); "
            "or use HERMES_QUANTIZATION=none, or an AWQ/GPTQ checkpoint"
        ) from None
    from transformers import BitsAndBytesConfig

    if kind == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def cpu_threads(settings: Settings, *, prefill: bool = False) -> int:
    """Threads for a CPU model: HERMES_CPU_THREADS, else every core for prefill (and for the decode
    kernel, batched_linear, whose column chunks go to whichever core is free) and all but one for torch's
    own decode work, whose many small ops lose more to the event loop's thread than a core gives.

    Measured on the 2-core box (bench/worker_throughput.py), before the kernel: 16 conversations 419
    tokens/s with one torch decode thread against 353 with two; a cold 3,000-token prefill 2.0 s with two
    threads, 3.6 s with one.
    """
    cores = os.cpu_count() or 1
    return settings.cpu_threads or (cores if prefill else max(1, cores - 1))


def model_folder(settings: Settings) -> Path | None:
    """The local folder HERMES_MODEL names, or None for a hub id; EngineError for a value that is neither."""
    try:
        local = local_model_dir(settings.model)
    except ValueError as exc:
        raise EngineError(f"HERMES_MODEL {settings.model}: {exc}") from None
    if local is None:
        check_hub_id(settings.model)
    return local


def check_settings(settings: Settings) -> None:
    """EngineError for settings this engine cannot work with, loading nothing (bot.engine.check_settings)."""
    model_folder(settings)
    resolve_device(settings.device)
    quantization_config(settings.quantization)


def load_model(settings: Settings) -> tuple[Any, Any, torch.device]:
    """Tokenizer and model from settings.model (HF id or local path), on the configured device/dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = model_folder(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    quant = quantization_config(settings.quantization)
    if device.type == "cpu" and local is None:  # a hub id: the download is about to start
        log.warning(
            "no GPU: HERMES_MODEL=%s will run on the CPU in %s. A 7B model needs about 30 GiB of RAM that way "
            "and answers slowly; without a GPU, HERMES_ENGINE=openai with LM Studio, llama.cpp or Ollama is "
            "the fast path (README: Without a GPU)", settings.model, str(dtype).removeprefix("torch."),
        )
    offline = local is None and cache_only(settings.model)
    source = str(local or settings.model)
    try:
        with offline_hub(offline):
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation="sdpa", quantization_config=quant,
                device_map=str(device) if quant is not None else None,
            )
    except OSError as exc:
        where = " from the local Hugging Face cache" if offline else ""
        raise EngineError(f"cannot load HERMES_MODEL={settings.model!r}{where}: {exc}") from exc
    except ValueError as exc:  # e.g. an architecture without SDPA attention, whose boolean masks the engine passes
        raise EngineError(f"HERMES_MODEL={settings.model!r} cannot run in this engine: {exc}") from exc
    if quant is None:
        model.to(device)
    model.eval()
    quiet_overlong_warning()
    return tokenizer, model, device


@dataclass(eq=False)
class _Running:
    """Engine-thread state of one request."""

    stream: GenerationStream
    ids: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_new: int
    detok: IncrementalDetokenizer
    stops: StopMatcher
    cached: int = 0  # tokens whose KV is in the slot
    generated: int = 0
    slot: int = -1
    out: list[TextChunk | Finish] = field(default_factory=list)


class TransformersEngine(Engine):
    """Continuous batching over `SlotKV` with prefix reuse. `model`/`tokenizer` may be passed in (benchmarks).

    `cuda_graphs` (default: on a CUDA device) runs decode steps through `DecodeGraphs`; on the CPU
    that means the same padded buckets, run eagerly (how the tests check them).
    """

    name = "transformers"

    def __init__(
        self, settings: Settings, *, model: Any = None, tokenizer: Any = None, cuda_graphs: bool | None = None
    ) -> None:
        self.settings = settings
        self.model, self.tokenizer = model, tokenizer
        self.cuda_graphs = cuda_graphs
        self.graphs: DecodeGraphs | None = None
        self.device = next(model.parameters()).device if model is not None else None
        self._inbox: deque[_Running] = deque()  # prepared on the prompt thread, for the engine thread to take
        self._to_encode: queue.SimpleQueue[GenerationStream | None] = queue.SimpleQueue()  # None: stop encoding
        self._prompt_thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: deque[_Running] = deque()
        self._running: list[_Running] = []  # index == slot
        self._prefilling: list[_Running] = []  # in the slots right after the running requests

    # -- lifecycle (event loop) ---------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.model is None:
            self.tokenizer, self.model, self.device = await in_daemon_thread(lambda: load_model(self.settings), name="hermes-model-load")
        await asyncio.to_thread(self._setup)
        self._prompt_thread = threading.Thread(target=self._encode_prompts, name="hermes-prompts", daemon=True)
        self._prompt_thread.start()
        self._thread = threading.Thread(target=self._run, name="hermes-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._prompt_thread is not None:
            self._to_encode.put(None)  # after the prompts left, which get the shutdown error at once
            await asyncio.to_thread(self._prompt_thread.join)
            self._prompt_thread = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._fail_all(EngineError("the engine is shutting down"))  # prepared after the engine thread's last look

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if self._thread is None or self._prompt_thread is None or self._stopping:
            raise EngineError("the transformers engine is not running")
        stream = GenerationStream(request, self._loop)
        self._to_encode.put(stream)
        return stream

    @property
    def running(self) -> int:
        return len(self._running)

    def capacity(self, wanted: int) -> int:
        return min(wanted, self.kv.slots)  # the slots the free memory held (_slots)

    # -- engine thread ------------------------------------------------------------------------
    def _setup(self) -> None:
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text_config, "max_position_embeddings", None) or self.settings.context_tokens
        self.max_len = min(self.settings.context_tokens, limit)
        try:
            self.attention = Attention.of(text_config)
        except ValueError as exc:
            raise EngineError(f"{self.settings.model}: {exc}") from None
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            dtype = torch.bfloat16
        shape = dict(layers=text_config.num_hidden_layers, kv_heads=text_config.num_key_value_heads,
                     max_len=self.max_len, head_dim=head_dim, dtype=dtype)
        slots = self._slots(slot_bytes(**shape))
        try:
            self.kv = SlotKV(slots=slots, device=self.device, **shape)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # RuntimeError: the CPU allocator's refusal
            raise EngineError(
                f"cannot allocate the KV cache of {slots} conversations x {self.max_len} tokens on {self.device} "
                f"({exc}); lower HERMES_MAX_BATCH_SIZE or HERMES_CONTEXT_TOKENS"
            ) from None
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.seen = torch.zeros((slots, vocab), dtype=torch.bool, device=self.device)
        self.temperature = torch.zeros(slots, device=self.device)
        self.top_p = torch.ones(slots, device=self.device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.penalty = torch.ones(slots, device=self.device)
        self.prefixes = PrefixCache(self.settings.prefix_cache_mb * 1024 * 1024)
        self.eos_ids = self._eos_ids()
        on_gpu = self.device.type == "cuda"
        threads = cpu_threads(self.settings, prefill=True)
        if self.device.type == "cpu" and (layers := batched_linear.install(self.model, threads)):
            log.info("CPU decode batches of %d+ rows use the AVX2 kernel in %d linear layers on %d threads",
                     MIN_ROWS, layers, threads)
        if self.cuda_graphs if self.cuda_graphs is not None else on_gpu:
            self.graphs = DecodeGraphs(self.model, self.kv, self.attention, capture=on_gpu)
            if on_gpu:
                with torch.inference_mode():
                    self.graphs.warm_up()

    def _slots(self, per_slot: int) -> int:
        """HERMES_MAX_BATCH_SIZE, or as many slots as the free memory holds, saying so; none is an error."""
        wanted, gib = self.settings.max_batch_size, 1024**3
        free = free_memory(self.device)
        slots = slots_that_fit(wanted, per_slot, free, reserved=self.settings.prefix_cache_mb * 1024 * 1024)
        if slots < wanted:
            need = f"{wanted} conversations x {self.max_len} tokens need {wanted * per_slot / gib:.1f} GiB of KV cache"
            have = f"{(free or 0) / gib:.1f} GiB is free on {self.device}"
            if slots == 0:
                raise EngineError(f"one conversation of {self.max_len} tokens needs {per_slot / gib:.1f} GiB of KV "
                                  f"cache and {have}: lower HERMES_CONTEXT_TOKENS")
            log.warning("%s and %s: generating for %d at once (set HERMES_MAX_BATCH_SIZE or HERMES_CONTEXT_TOKENS "
                        "to choose)", need, have, slots)
        return slots

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return ids

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    busy = self._step()
                except Exception as exc:  # a failed forward must not kill the worker: fail what is running
                    log.exception("engine step failed")
                    self._fail_all(EngineError(f"generation failed: {exc}"))
                    busy = False
                if not busy:
                    self._wake.wait(0.05)
                    self._wake.clear()
            self._fail_all(EngineError("the engine is shutting down"))

    def _step(self) -> bool:
        self._take_new()
        self._drop_cancelled()
        if not self._prefilling:
            self._fill_prefill_group()
        if self._prefilling:
            self._prefill_chunk()
            self._flush()  # new requests' first text goes out now, not a whole decode step later
        if self._running:
            self._decode_step()
        self._flush()
        return bool(self._running or self._prefilling or self._waiting or self._inbox)

    # -- prompt thread ------------------------------------------------------------------------
    def _encode_prompts(self) -> None:
        while (stream := self._to_encode.get()) is not None:
            try:
                self._prepare_for_engine(stream)
            except Exception:  # e.g. its event loop closed: the prompts after it still get their turn
                log.exception("handing a prompt to the engine failed")

    def _prepare_for_engine(self, stream: GenerationStream) -> None:
        """Encode a request's prompt and hand it to the engine thread; a request that cannot be encoded
        fails alone, and one cancelled while it waited ends without being encoded."""
        if stream.cancelled:  # as the engine thread ends a cancelled request that waits (nothing generated)
            stream.feed_threadsafe([Finish(stream.cancel_reason or "cancelled")])
            return
        if self._stopping:
            stream.feed_threadsafe([EngineError("the engine is shutting down")])
            return
        try:
            run = self._prepare(stream)
        except EngineError as exc:
            stream.feed_threadsafe([exc])
            return
        except Exception as exc:  # e.g. a model's chat template refusing these messages
            log.exception("preparing a request failed")
            stream.feed_threadsafe([EngineError(f"the prompt could not be built: {exc}")])
            return
        self._inbox.append(run)
        self._wake.set()

    def _prepare(self, stream: GenerationStream) -> _Running:
        request = stream.request
        try:
            prompt = encode_messages(
                self.tokenizer, request.messages, context_tokens=self.max_len,
                max_new_tokens=request.sampling.max_new_tokens,
            )
        except PromptTooLong as exc:
            raise EngineError(str(exc)) from None
        # A resumed reply (another worker wrote its start) continues after that text and within what is
        # left of the persona's max_new_tokens.
        written: list[int] = []
        if request.assistant_prefix:
            written = self.tokenizer(
                request.assistant_prefix, add_special_tokens=False, split_special_tokens=True
            )["input_ids"]
        ids = [*prompt.ids, *written]  # the prompt fits with room for a reply; written text may fill the rest
        max_new = min(request.sampling.max_new_tokens - len(written), self.max_len - len(ids))
        return _Running(
            stream=stream, ids=ids, prompt_len=len(ids), max_new=max_new,
            detok=IncrementalDetokenizer(self.tokenizer, shown=written), stops=request.stop_matcher(),
        )

    # -- engine thread, continued -------------------------------------------------------------
    def _take_new(self) -> None:
        while self._inbox:
            run = self._inbox.popleft()
            if run.max_new > 0:
                self._waiting.append(run)
            else:  # a resumed reply that already has all its tokens
                self._finish(run, "length", keep=False)

    def _drop_cancelled(self) -> None:
        for run in [r for r in self._waiting if r.stream.cancelled]:
            self._waiting.remove(run)
            self._finish(run, run.stream.cancel_reason or "cancelled", keep=False)
        cancelled = [r for r in self._prefilling if r.stream.cancelled]
        if cancelled:
            self._prefilling = [r for r in self._prefilling if not r.stream.cancelled]
            for run in cancelled:
                self._finish(run, run.stream.cancel_reason or "cancelled", keep=False)
            self._pack_prefilling()
        for run in [r for r in self._running if r.stream.cancelled]:
            self._finish(run, run.stream.cancel_reason or "cancelled")

    def _fill_prefill_group(self) -> None:
        """Move the waiting prompts to prefill in one forward into `_prefilling`: as many as the free slots
        and PREFILL_CHUNK padded tokens (rows x longest) allow, so a burst of channels starts together. A
        longer prompt goes alone, in chunks. Each one first copies its longest known prefix into its slot.
        A run leaves `_waiting` only once it is in `_prefilling`, so a failure finds it in one of them.
        A step that prefills a burst's shared prefix forms no group: one prompt forward per step."""
        if self._prefill_shared_prefix():
            return
        group = self._prefilling
        while self._waiting and len(self._running) + len(group) < self.kv.slots:
            run = self._waiting[0]
            source, shared = self._known_prefix(run.ids)
            shared = min(shared, run.prompt_len - 1)  # at least one token must run to get the next logits
            longest = max([run.prompt_len - shared, *(r.prompt_len - r.cached for r in group)])
            if group and longest * (len(group) + 1) > PREFILL_CHUNK:
                break
            run.slot = len(self._running) + len(group)
            if shared > 0:
                self._copy_prefix(source, run.slot, shared)
                run.cached = shared
            self._set_row(run.slot, run)
            group.append(self._waiting.popleft())

    def _prefill_shared_prefix(self) -> bool:
        """Prefill the prompt prefix the first waiting request shares with others that get a slot now (a
        persona's system prompt, when a burst of channels talks to it at once) into the prefix cache, where
        each of them then finds it, as after a finished turn: on a fresh engine every one prefilled it again.
        Runs in chunks of PREFILL_CHUNK tokens, a step each, from what the cache already holds; False when
        no MIN_SHARED_PREFIX new tokens are shared or the cache could not keep them (the forward would be lost)."""
        candidates = list(self._waiting)[: self.kv.slots - len(self._running)]
        if len(candidates) < 2:
            return False
        first, *others = candidates
        ids = torch.tensor(first.ids)
        shared = max(min(common_prefix(ids, torch.tensor(r.ids)), r.prompt_len - 1) for r in others)
        source, cached = self._known_prefix(first.ids)
        length = min(shared, first.prompt_len - 1, cached + PREFILL_CHUNK)  # each must still run a token of its own
        token_bytes = sum(buf[0, :, 0].nbytes for buf in (*self.kv.keys, *self.kv.values))
        if length - cached < MIN_SHARED_PREFIX or length * token_bytes > self.prefixes.max_bytes:
            return False
        slot = len(self._running)
        self._copy_prefix(source, slot, cached)
        self._prefill_forward(slot, [cached], [first.ids[cached:length]])
        self.prefixes.store(PrefixEntry(ids[:length], *self.kv.read(slot, length)))
        return True

    def _known_prefix(self, ids: list[int]) -> tuple[PrefixEntry | int | None, int]:
        """Where the longest already computed prefix of `ids` is, and its length: an entry of the prefix
        cache, or the slot of a running request (its KV holds its ids up to `cached`). Why running slots:
        a burst that reaches the engine over a few steps finds the persona's prompt in the first one's slot
        long before that request finishes and leaves it to the prefix cache."""
        key = torch.tensor(ids)
        source: PrefixEntry | int | None
        source, best = self.prefixes.lookup(key)
        for run in self._running:
            shared = common_prefix(torch.tensor(run.ids[: run.cached]), key)
            if shared > best:
                source, best = run.slot, shared
        return source, best

    def _copy_prefix(self, source: PrefixEntry | int | None, slot: int, length: int) -> None:
        """Copy the first `length` positions of a `_known_prefix` source into `slot`."""
        if isinstance(source, PrefixEntry):
            self.kv.load(slot, source.keys, source.values, length)
        elif source is not None:
            self.kv.move(source, slot, length)

    def _set_row(self, slot: int, run: _Running) -> None:
        s = run.stream.request.sampling
        self.temperature[slot] = s.temperature
        self.top_p[slot] = s.top_p
        self.top_k[slot] = s.top_k
        self.penalty[slot] = s.repetition_penalty
        self.seen[slot] = False
        self.seen[slot, torch.tensor(run.ids, device=self.device)] = True

    def _use_threads(self, *, prefill: bool) -> None:
        """On CPU, switch torch's (process-wide) thread count between prefill and decode."""
        if self.device is not None and self.device.type == "cpu":
            wanted = cpu_threads(self.settings, prefill=prefill)
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)

    def _prefill_chunk(self) -> None:
        """One forward over the prefill group, left-padded to its longest prompt; when it completes,
        the group samples its first tokens and joins the decode batch."""
        group = self._prefilling
        starts = [r.cached for r in group]
        lengths = [r.prompt_len - r.cached for r in group]
        if len(group) == 1 and self._running:
            lengths = [min(lengths[0], PREFILL_CHUNK)]
        runs = [r.ids[s : s + n] for r, s, n in zip(group, starts, lengths, strict=True)]
        logits = self._prefill_forward(group[0].slot, starts, runs).float()
        for run, n in zip(group, lengths, strict=True):
            run.cached += n
        if group[0].cached < group[0].prompt_len:  # a lone long prompt: more chunks next steps
            return
        self._prefilling = []
        first = group[0].slot
        chosen = self._sample(logits, slice(first, first + len(group))).tolist()
        self._running.extend(group)
        for run, token in zip(group, chosen, strict=True):
            self._accept(run, token)

    def _prefill_forward(self, first_slot: int, starts: list[int], runs: list[list[int]]) -> torch.Tensor:
        """One forward of prompt token runs, left-padded to the longest, row i into slot first_slot + i from
        position starts[i]; the logits of each row's last token."""
        self._use_threads(prefill=True)
        lengths = [len(run) for run in runs]
        q = max(lengths)
        tokens = torch.tensor([[PAD_ID] * (q - len(run)) + run for run in runs], device=self.device)
        positions = prefill_positions(starts, lengths, self.device)
        cache = PrefillCache(self.kv, first_slot, starts, lengths)
        return self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=self.attention.masks(positions, cache.kv_len),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    def _decode_step(self) -> None:
        self._use_threads(prefill=False)
        rows = len(self._running)
        tokens = [r.ids[-1] for r in self._running]
        positions = [r.cached for r in self._running]
        if self.graphs is not None and not self.graphs.failed:
            logits = self.graphs.logits(tokens, positions)
        else:
            logits = decode_logits(
                self.model, self.kv, torch.tensor(tokens, device=self.device).unsqueeze(-1),
                torch.tensor(positions, device=self.device), max(positions) + 1, self.attention,
            )
        chosen = self._sample(logits.float(), slice(0, rows)).tolist()
        batch = list(self._running)
        for run in batch:  # first, so slot moves made while accepting copy this step's KV too
            run.cached += 1
        for run, token in zip(batch, chosen, strict=True):
            self._accept(run, token)

    def _sample(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        logits = apply_repetition_penalty(logits, self.seen[rows], self.penalty[rows])
        chosen = sample_next(
            logits, temperature=self.temperature[rows], top_k=self.top_k[rows], top_p=self.top_p[rows]
        )
        index = torch.arange(rows.start, rows.stop, device=self.device)
        self.seen[index, chosen] = True
        return chosen

    def _accept(self, run: _Running, token: int) -> None:
        """Append one generated token: stream its text, or finish on eos / stop string / length."""
        run.generated += 1
        if token in self.eos_ids:
            self._emit(run, run.stops.flush())
            self._finish(run, "stop")
            return
        run.ids.append(token)
        text, stopped = run.stops.feed(run.detok.push(token))
        self._emit(run, text)
        if stopped:
            self._finish(run, "stop")
        elif run.generated >= run.max_new or len(run.ids) >= self.max_len:
            self._emit(run, run.stops.flush())
            self._finish(run, "length")

    def _emit(self, run: _Running, text: str) -> None:
        if text:
            run.out.append(TextChunk(text))

    def _finish(self, run: _Running, reason: FinishReason, keep: bool = True) -> None:
        """End a request: send its Finish, keep its KV as a reusable prefix, free its slot."""
        run.out.append(Finish(reason, prompt_tokens=run.prompt_len, completion_tokens=run.generated))
        if run in self._running:
            if keep and run.cached:
                keys, values = self.kv.read(run.slot, run.cached)
                self.prefixes.store(PrefixEntry(torch.tensor(run.ids[: run.cached]), keys, values))
            self._release_slot(run)
        self._send(run)

    def _release_slot(self, run: _Running) -> None:
        last = self._running.pop()
        if last is not run:
            self._move(last, run.slot)
            self._running[run.slot] = last
        self._pack_prefilling()

    def _pack_prefilling(self) -> None:
        """Keep the prefill group in the slots right after the running requests (moving down, in order)."""
        for i, run in enumerate(self._prefilling):
            if run.slot != len(self._running) + i:
                self._move(run, len(self._running) + i)

    def _move(self, run: _Running, slot: int) -> None:
        self.kv.move(run.slot, slot, run.cached)
        for row in (self.temperature, self.top_p, self.top_k, self.penalty, self.seen):
            row[slot] = row[run.slot]
        run.slot = slot

    def _send(self, run: _Running) -> None:
        if run.out:
            run.stream.feed_threadsafe(run.out)
            run.out = []

    def _flush(self) -> None:
        for run in self._running:
            self._send(run)

    def _fail_all(self, error: EngineError) -> None:
        runs = [*self._running, *self._waiting, *self._prefilling]
        self._running, self._prefilling = [], []
        self._waiting.clear()
        for run in runs:
            run.stream.feed_threadsafe([error])
        while self._inbox:
            self._inbox.popleft().stream.feed_threadsafe([error])
