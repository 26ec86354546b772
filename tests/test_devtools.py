"""`hermes-bot dev tiny-model` writes a loadable Mistral + ChatML tokenizer without any download."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_model_command_writes_a_loadable_chatml_model(tmp_path: Path) -> None:
    target = tmp_path / "m"
    done = subprocess.run(
        [sys.executable, "-m", "bot", "dev", "tiny-model", str(target), "--hidden-size", "32", "--layers", "1",
         "--context", "512"],
        capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.hidden_size == 32
    assert model.config.max_position_embeddings == tokenizer.model_max_length == 512  # one context for both
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenizer.all_special_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Byte-level BPE: any text round-trips, including text outside the training corpus.
    sample = "Zebra 🦓 ŷ ∑ unseen words"
    assert tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False)) == sample
