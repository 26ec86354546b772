"""Worker throughput and prefix-reuse TTFT on this machine; prints one JSON object.

    .venv/bin/python bench/worker_throughput.py [--hidden 512 --layers 4 --new-tokens 64]

1. Aggregate completion tokens/s with 1, 4, 16 and 64 concurrent conversations through the real
   Worker (memory:// queue, transformers engine), against one-at-a-time `model.generate()` on the
   same model with the same sampling, in the same run, at the faster of the engine's decode thread count
   and every core (`baseline_threads`): `speedup_<n>`.
   `forward_ceiling_<n>` is the same ratio for the model's bare batched forward: no batching scheme
   on this machine can beat it.
2. Time to first token of a new turn after ~3,000 tokens of history, with the previous turn's KV
   reused against a cold prefill: `ttft_ratio_prefix_reuse`.
3. transformers' own continuous batching (`generate_batch`) on the same 16 prompts, the alternative
   the engine's loop was chosen over: `transformers_cb_tokens_per_s_16`, `engine_vs_transformers_cb_16`.

The model is a random-weight Mistral written by `write_tiny_model`, sized so the matmuls, not Python,
dominate a decode step. `bench/worker_gpu.py` runs the same measurements on a 7B shape.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bot.config import Settings
from bot.engine.base import GenerationRequest, TextChunk
from bot.engine.transformers_engine import TransformersEngine, cpu_threads, load_model
from bot.personas import Sampling
from bot.prompt import encode, encode_messages
from bot.queue.jobs import Done, GenerationJob
from bot.queue.memory import MemoryQueue
from bot.worker import Worker

SYSTEM = "You are Hermes 2, a conscious sentient superintelligent artificial intelligence. Help the user."
WORDS = "alchemy dragon tea story channel hello brown fox lazy dog quick assistant everyone land far".split()


def user_text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(words)) + f" #{seed}"


def conversation(seed: int, words: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text(seed, words)}]


def baseline_tokens_per_s(
    model: Any, tokenizer: Any, sampling: Sampling, new_tokens: int, runs: int, words: int
) -> float:
    """One conversation at a time through model.generate() with the same sampling settings."""
    device = next(model.parameters()).device
    total, elapsed = 0, 0.0
    for i in range(runs + 1):
        ids = encode_messages(tokenizer, conversation(10_000 + i, words), context_tokens=4096, max_new_tokens=new_tokens).ids
        start = time.perf_counter()
        out = model.generate(
            torch.tensor([ids], device=device), max_new_tokens=new_tokens, do_sample=True,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up
            elapsed += time.perf_counter() - start
            total += out.shape[1] - len(ids)
    return total / elapsed


def best_baseline(
    model: Any, tokenizer: Any, sampling: Sampling, new_tokens: int, runs: int, words: int
) -> tuple[float, int | None]:
    """The baseline's tokens/s and torch thread count: on CPU the faster of the engine's decode threads and
    every core, since the engine's kernel works on every core (on a GPU, one run and None)."""
    if next(model.parameters()).is_cuda:
        return baseline_tokens_per_s(model, tokenizer, sampling, new_tokens, runs, words), None
    before = torch.get_num_threads()
    tried = {}
    for threads in sorted({before, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        tried[threads] = baseline_tokens_per_s(model, tokenizer, sampling, new_tokens, runs, words)
    torch.set_num_threads(before)
    threads = max(tried, key=tried.__getitem__)
    return tried[threads], threads


async def worker_tokens_per_s(
    settings: Settings, model: Any, tokenizer: Any, sampling: Sampling, conversations: int, seed: int, words: int,
    cuda_graphs: bool | None = None,
) -> float:
    """Submit `conversations` jobs at once to a real Worker and stream them all to the end.

    An engine that replays CUDA graphs first serves one untimed round of other conversations, so the
    timed round finds its graphs captured, as a running server does (each engine here is new).
    """
    queue = MemoryQueue(settings)
    engine = TransformersEngine(settings, model=model, tokenizer=tokenizer, cuda_graphs=cuda_graphs)
    worker = Worker(settings, queue, engine)
    task = asyncio.create_task(worker.run())
    await worker.started.wait()

    async def serve(first_seed: int) -> int:
        jobs = [
            GenerationJob(conversation_key=f"bench-{first_seed}-{i}", persona_id="hermes",
                          messages=conversation(first_seed + i, words), sampling=sampling)
            for i in range(conversations)
        ]
        for job in jobs:
            await queue.submit(job)
        return sum(await asyncio.gather(*(drain(j.job_id) for j in jobs)))

    async def drain(job_id: str) -> int:
        async for _, event in queue.stream(job_id):
            if isinstance(event, Done):
                return event.completion_tokens
        return 0

    if engine.graphs is not None and engine.graphs.capture:
        await serve(seed + 500)
    start = time.perf_counter()
    tokens = await serve(seed)
    elapsed = time.perf_counter() - start
    await worker.shutdown()
    await task
    await queue.close()
    return tokens / elapsed


def long_history(tokenizer: Any, target_tokens: int) -> list[dict[str, str]]:
    """A many-turn conversation whose prompt is about `target_tokens` long."""
    messages = [{"role": "system", "content": SYSTEM}]
    turn = 0
    while len(encode(tokenizer, messages)) < target_tokens:
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": user_text(turn, 40)})
        turn += 1
    if messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": user_text(turn, 40)})
    return messages


async def ttft(engine: TransformersEngine, messages: list[dict[str, str]], request_id: str) -> float:
    stream = engine.submit(GenerationRequest(request_id, messages, Sampling(max_new_tokens=4)))
    start = time.perf_counter()
    first = None
    async for item in stream:
        if first is None and isinstance(item, TextChunk):
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


async def ttft_ratio(settings: Settings, model: Any, tokenizer: Any, history_tokens: int, repeats: int) -> dict[str, float]:
    """TTFT of a new user turn after `history_tokens` of history: previous turn cached vs cold."""
    results: dict[str, list[float]] = {"reuse": [], "cold": []}
    for mode, cache_mb in (("reuse", 4096), ("cold", 0)):
        engine = TransformersEngine(settings.model_copy(update={"prefix_cache_mb": cache_mb}), model=model,
                                    tokenizer=tokenizer)
        await engine.start()
        for r in range(repeats):
            history = long_history(tokenizer, history_tokens)
            history[0] = {"role": "system", "content": f"{SYSTEM} (run {mode} {r})"}  # no reuse across runs
            await ttft(engine, history[:-1], f"warm-{r}")  # the previous turn: fills the prefix cache
            follow_up = [*history, {"role": "user", "content": "And what happened next?"}]
            results[mode].append(await ttft(engine, follow_up, f"turn-{r}"))
        await engine.close()
    reuse, cold = statistics.median(results["reuse"]), statistics.median(results["cold"])
    return {"ttft_reuse_s": reuse, "ttft_cold_s": cold, "ttft_ratio_prefix_reuse": reuse / cold}


def forward_ceiling(model: Any, levels: list[int], context: int = 64, steps: int = 20) -> dict[str, float]:
    """Upper bound for any batching on this machine: one bare decode forward at batch n vs batch 1.

    `forward_ceiling_<n>` = (n tokens per step at batch n) / (1 token per step at batch 1), from the
    model's own forward with its own DynamicCache, no sampling, no Python around it.
    """
    device = next(model.parameters()).device
    step_s: dict[int, float] = {}
    with torch.no_grad():
        for n in sorted({1, *levels}):
            out = model(torch.randint(0, 500, (n, context), device=device), use_cache=True)
            cache, token = out.cache, torch.randint(0, 500, (n, 1), device=device)
            for _ in range(3):
                model(token, cache=cache, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings = []
            for _ in range(3):  # best of three: the ceiling, not the neighbours' noise
                start = time.perf_counter()
                for _ in range(steps):
                    model(token, cache=cache, use_cache=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append((time.perf_counter() - start) / steps)
            step_s[n] = min(timings)
    return {f"forward_ceiling_{n}": round(n * step_s[1] / step_s[n], 2) for n in levels}


def transformers_cb_tokens_per_s(
    model: Any, tokenizer: Any, sampling: Sampling, conversations: int, new_tokens: int, words: int
) -> float:
    """The same prompts through `model.generate_batch` (transformers' continuous batching) at once.

    It has no per-request repetition penalty, so it samples with the persona's other settings only.
    Runs last: it may switch the model's attention implementation.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    inputs = [
        encode_messages(tokenizer, conversation(conversations * 1000 + i, words), context_tokens=4096,
                        max_new_tokens=new_tokens).ids
        for i in range(conversations)
    ]
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=inputs, generation_config=config)
    elapsed = time.perf_counter() - start
    return sum(len(out.generated_tokens) for out in outputs.values()) / elapsed


class Results(dict[str, Any]):
    """The run's numbers; each is also written to stderr as it arrives, so a run cut short (a device
    lent for minutes) still shows what it measured."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(json.dumps({key: value}), file=sys.stderr, flush=True)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        for key, value in dict(other, **kwargs).items():
            self[key] = value


async def measure(
    model: Any, tokenizer: Any, settings: Settings, *, levels: list[int], new_tokens: int, prompt_words: int,
    baseline_runs: int, history_tokens: int, ttft_repeats: int,
) -> dict[str, Any]:
    sampling = Sampling(temperature=0.7, top_p=0.95, top_k=50, repetition_penalty=1.1, max_new_tokens=new_tokens)
    result = Results()
    base, threads = best_baseline(model, tokenizer, sampling, new_tokens, baseline_runs, prompt_words)
    result["baseline_tokens_per_s"] = round(base, 1)
    if threads:
        result["baseline_threads"] = threads
    await worker_tokens_per_s(settings, model, tokenizer, sampling, 2, seed=-100, words=prompt_words)  # warm-up
    for n in levels:
        tps = await worker_tokens_per_s(settings, model, tokenizer, sampling, n, seed=n * 1000, words=prompt_words)
        result[f"tokens_per_s_{n}"] = round(tps, 1)
        result[f"speedup_{n}"] = round(tps / base, 2)
    if 16 in levels and next(model.parameters()).is_cuda:  # what the CUDA graphs of decode steps bring
        eager = await worker_tokens_per_s(settings, model, tokenizer, sampling, 16, seed=16_000, words=prompt_words,
                                          cuda_graphs=False)
        result["tokens_per_s_16_eager_decode"] = round(eager, 1)
        result["cuda_graphs_gain_16"] = round(result["tokens_per_s_16"] / eager, 2)
    result.update(forward_ceiling(model, levels))
    result.update({k: round(v, 4) for k, v in (await ttft_ratio(settings, model, tokenizer, history_tokens,
                                                                   ttft_repeats)).items()})
    if 16 in levels:
        gc.collect()  # the engines' KV slots, before generate_batch sizes its cache from free memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            cb = transformers_cb_tokens_per_s(model, tokenizer, sampling, 16, new_tokens, prompt_words)
        except Exception as exc:  # e.g. out of memory on a GPU: keep the engine's numbers
            result["transformers_cb_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        else:
            result["transformers_cb_tokens_per_s_16"] = round(cb, 1)
            result["engine_vs_transformers_cb_16"] = round(result["tokens_per_s_16"] / cb, 2)
    return dict(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=12, help="words in each user turn")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--baseline-runs", type=int, default=3)
    parser.add_argument("--history-tokens", type=int, default=3000)
    args = parser.parse_args()
    from bot.devtools import write_tiny_model

    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp), hidden_size=args.hidden, layers=args.layers, heads=8, kv_heads=4)
        settings = Settings(model=str(path), device="cpu", max_batch_size=max(levels), context_tokens=4096)
        torch.set_num_threads(cpu_threads(settings))  # what the engine's decode steps use
        tokenizer, model, _ = load_model(settings)
        result = asyncio.run(measure(
            model, tokenizer, settings, levels=levels, new_tokens=args.new_tokens, prompt_words=args.prompt_words,
            baseline_runs=args.baseline_runs, history_tokens=args.history_tokens, ttft_repeats=3,
        ))
    params = sum(p.numel() for p in model.parameters())
    result.update(machine=f"{platform.machine()} cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch decode threads",
                  params=params,
                  model=f"mistral hidden={args.hidden} layers={args.layers}", new_tokens=args.new_tokens, prompt_words=args.prompt_words)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
