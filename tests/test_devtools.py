"""`hermes-bot dev tiny-model` writes a loadable Mistral + ChatML tokenizer without any download."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main

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


@pytest.mark.parametrize(("args", "problem"), [
    (["--hidden-size", "30"], "--hidden-size 30 must split into --heads 4 of an even size each"),
    (["--heads", "4", "--kv-heads", "3"], "--heads 4 must be a multiple of --kv-heads 3"),
    (["--layers", "0"], "argument --layers: must be at least 1 (got 0)"),
])
def test_a_model_shape_it_cannot_have_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], problem: str
) -> None:
    """These ended in a traceback from deep inside transformers, or wrote a model with no layers."""
    with contextlib.suppress(SystemExit):  # argparse's own errors exit 2
        assert main(["dev", "tiny-model", str(tmp_path / "m"), *args]) == 2
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_folder_with_other_files_or_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["dev", "tiny-model", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["dev", "tiny-model", str(tmp_path / "notes.txt")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("where", ["/proc/x", "notes.txt/m"])
def test_a_folder_it_cannot_create_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """/proc takes no new folders, a file takes no folder in it: both were a FileNotFoundError (or NotADirectoryError)
    traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["dev", "tiny-model", where]) == 2
    assert capsys.readouterr().err.startswith(f"hermes-bot: cannot write the model to {where}: ")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
