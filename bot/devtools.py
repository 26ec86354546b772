"""`hermes-bot dev tiny-model`: a tiny random-weight Mistral with a ChatML tokenizer, built offline.

Tests and local trials need a model that loads through the same transformers code as the real one
without any download: a byte-level BPE tokenizer trained here on a small built-in corpus, with
`<|im_start|>` / `<|im_end|>` as special tokens, the ChatML chat template, and eos `<|im_end|>`.
"""

from __future__ import annotations

from pathlib import Path

from bot.prompt import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """
You are a helpful assistant. Hello, who are you? Hi there! My name is Hermes 2.
The quick brown fox jumps over the lazy dog. Edward Elric is a state alchemist.
user assistant system: Alice Bob Carol Dave Eve Mallory said hello to everyone in the channel.
Once upon a time, in a land far away, there lived a dragon who loved stories and tea.
def main():\n    print("hello world")\n    return 0\n
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation . , ; : ! ? ' " ( ) [ ] { } - _ * # @ /
Équivalence, naïve café, 日本語のテキスト, emoji 🙂🎉, Ünïcödé text keeps working.
"""


def build_tokenizer(vocab_size: int = 1024, model_max_length: int = 4096):  # type: ignore[no-untyped-def]
    """A byte-level BPE PreTrainedTokenizerFast with ChatML specials, trained on the built-in corpus;
    `model_max_length` is the model's context, which `hermes-bot prompt` reads from the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
    )


def write_tiny_model(
    path: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    context: int = 4096,
    seed: int = 0,
) -> Path:
    """Write tokenizer + random-weight MistralForCausalLM to `path` with save_pretrained. A shape the
    model cannot have is a ValueError saying which numbers to change."""
    if hidden_size % heads or (hidden_size // heads) % 2:
        raise ValueError(f"--hidden-size {hidden_size} must split into --heads {heads} of an even size each "
                         f"(e.g. --hidden-size {heads * 16})")
    if heads % kv_heads:
        raise ValueError(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(model_max_length=context)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
