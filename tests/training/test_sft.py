"""Causal-LM fine-tuning on a tiny Llama: replies-only loss, training that learns, LoRA adapters, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from helpers import TOY_PAIRS
from tuneloop.cli import app
from tuneloop.config import SftRecipe, load_config
from tuneloop.errors import TuneloopError
from tuneloop.models.lm import GenerationSettings, ReplyModel, cut_at_stop
from tuneloop.training import sft
from tuneloop.training.sft import read_conversations, tokenize_conversation

runner = CliRunner()


def test_only_the_assistant_tokens_carry_labels(tiny_lm):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    messages = [
        {"role": "system", "content": "you are a helpful shop"},
        {"role": "user", "content": "where is my parcel"},
        {"role": "assistant", "content": "your parcel is with the courier"},
        {"role": "user", "content": "can i cancel my order"},
        {"role": "assistant", "content": "yes before it ships"},
    ]
    ids, labels = tokenize_conversation(tokenizer, messages, max_length=200)
    learned = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
    assert learned.split() == [
        "your",
        "parcel",
        "is",
        "with",
        "the",
        "courier",
        "<|im_end|>",
        "yes",
        "before",
        "it",
        "ships",
        "<|im_end|>",
    ]
    assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))


def test_bad_conversations_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "hi", "reply": "hello"}\n{"question": "x"}\n', encoding="utf-8")
    with pytest.raises(TuneloopError, match="row 2: needs prompt and reply"):
        read_conversations([path], None)
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(TuneloopError, match="row 1: no assistant message"):
        read_conversations([chat], None)
    with pytest.raises(TuneloopError, match="no training conversations given"):
        read_conversations([], None)


def sft_config(tiny_lm, pairs, home, *extra):
    return load_config(
        None,
        [
            f"sft.model={tiny_lm}",
            f"sft.paths=[{pairs}]",
            f"registry.home={home}",
            "name=replies",
            "sft.epochs=8",
            "sft.batch_size=4",
            "sft.lr=1e-2",
            "sft.val_size=0.2",
            "sft.threads=1",
            *extra,
        ],
        SftRecipe,
    )


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fine_tuning_lowers_the_held_out_loss_and_registers(tiny_lm, pairs_file, home, tmp_path, method):
    outcome = sft.run(sft_config(tiny_lm, pairs_file, home, f"sft.method={method}"), show_progress=False)
    assert outcome.history[-1]["heldout_loss"] < outcome.heldout_loss_before
    folder = home / "models" / "replies" / "v1" / "model"
    assert (folder / "adapter_config.json").is_file() == (method == "lora")
    assert outcome.version.metrics["kind"] == "generator"
    reply = ReplyModel(folder).generate(
        [{"role": "user", "content": "where is my parcel"}], GenerationSettings(max_new_tokens=8)
    )
    assert reply and set(reply.split()) <= {w for q, a in TOY_PAIRS for w in (q + " " + a).split()}


def test_generate_cli_and_stop_strings(tiny_lm, pairs_file, home):
    sft.run(sft_config(tiny_lm, pairs_file, home), show_progress=False)
    result = runner.invoke(app, ["generate", "--model", "replies@1", "where is my parcel", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    streamed = runner.invoke(
        app, ["generate", "--model", "replies@1", "where is my parcel", "--stream", "--max-new-tokens", "8"]
    )
    assert streamed.exit_code == 0 and streamed.output.strip() == result.output.strip()
    assert cut_at_stop("your parcel. User: more", ["User:", "\n\n"]) == "your parcel. "


def test_a_generation_that_fails_raises_instead_of_hanging_the_stream(tiny_lm, monkeypatch):
    replier = ReplyModel(tiny_lm)

    def broken(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(replier.model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(replier.stream([{"role": "user", "content": "where is my parcel"}]))


def test_a_chat_may_open_with_the_assistant(tiny_lm):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    ids, labels = tokenize_conversation(
        tokenizer,
        [{"role": "assistant", "content": "yes before it ships"}, {"role": "user", "content": "where is my parcel"}],
        200,
    )
    assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100]).split()[-2:] == [
        "ships",
        "<|im_end|>",
    ]


def test_sft_takes_the_gpu_settings_train_takes_and_refuses_what_this_machine_cannot_run(
    tiny_lm, pairs_file, home, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TuneloopError, match=r"sft\.device=cuda, and torch sees no CUDA GPU"):
        sft.run(sft_config(tiny_lm, pairs_file, home, "sft.device=cuda"), show_progress=False)
    with pytest.raises(TuneloopError, match=r"sft\.precision=fp16 needs a CUDA GPU"):
        sft.run(sft_config(tiny_lm, pairs_file, home, "sft.precision=fp16"), show_progress=False)


def test_fine_tuning_in_bf16_autocast_lowers_the_held_out_loss(tiny_lm, pairs_file, home):
    outcome = sft.run(sft_config(tiny_lm, pairs_file, home, "sft.precision=bf16"), register=False, show_progress=False)
    assert outcome.history[-1]["heldout_loss"] < outcome.heldout_loss_before
