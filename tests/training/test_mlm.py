"""MLM pretraining on tiny models: corpus reading, whole-word numbering, packing, masking, training, resume,
from-scratch tokenizers, and fine-tuning from a pretrained version."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from helpers import MOODS, TOPICS, toy_rows
from tuneloop.cli import app
from tuneloop.config import PretrainRecipe, load_config
from tuneloop.errors import TuneloopError
from tuneloop.models.scratch import bert_config, train_tokenizer
from tuneloop.training import mlm
from tuneloop.training.mlm import NO_WORD, mask_batch, pack_blocks, read_corpus, word_numbers


def corpus_file(tmp_path, count=160):
    path = tmp_path / "corpus.txt"
    texts = [r["text"] for r in toy_rows(count // 6, seed=2) + toy_rows(count // 6, seed=3, topics=MOODS)]
    path.write_text("\n".join(texts + texts[:5] + ["", "   "]), encoding="utf-8")  # duplicates and blanks
    return path


def test_read_corpus_cleans_and_deduplicates_txt_and_tables(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("Hello  <b>world</b>\nhello world\n\n我的快递\n", encoding="utf-8")
    table = tmp_path / "b.csv"
    pd.DataFrame({"review": ["我的快递", "new text"]}).to_csv(table, index=False)
    assert read_corpus([txt, table], "review") == ["Hello world", "我的快递", "new text"]
    with pytest.raises(TuneloopError, match="text file not found"):
        read_corpus([tmp_path / "nope.txt"], "text")
    with pytest.raises(TuneloopError, match="no unlabelled text given"):
        read_corpus([], "text")


def test_whole_words_group_chinese_characters_and_english_pieces(tiny_encoder):
    text = "我的快递 refunds"
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words = word_numbers(text, encoded["offset_mapping"])
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    by_word = {}
    for piece, word in zip(pieces, words, strict=True):
        by_word.setdefault(word, []).append(piece)
    groups = ["".join(p.replace("##", "") for p in group) for group in by_word.values()]
    assert "快递" in groups and "refunds" in groups and "我" in groups


def test_packing_makes_full_blocks_with_unique_words_per_text():
    encoded = [([5, 6, 7], [0, 0, 1]), ([8, 9], [0, 1]), ([10] * 20, list(range(20)))]
    blocks = pack_blocks(encoded, block_size=10, cls_id=1, sep_id=2)
    assert all(ids[0] == 1 and ids[-1] == 2 and len(ids) <= 10 for ids, _ in blocks)
    first_ids, first_words = blocks[0]
    assert first_ids[:7] == [1, 5, 6, 7, 2, 8, 9]
    assert first_words[:7] == [NO_WORD, 0, 0, 1, NO_WORD, 2, 3]  # text 2's words do not merge with text 1's


def test_masking_takes_whole_words_never_special_tokens_and_about_the_asked_share():
    ids = [1] + list(range(10, 410)) + [2]
    words = [NO_WORD] + [i // 2 for i in range(400)] + [NO_WORD]  # every word is two tokens
    vocabulary = list(range(10, 410))
    input_ids, attention, labels = mask_batch([(ids, words)] * 8, {1, 2}, 3, vocabulary, 0.15, random.Random(0))
    masked = labels != -100
    assert not masked[:, 0].any() and not masked[:, -1].any()
    share = masked[:, 1:-1].float().mean().item()
    assert 0.1 < share < 0.2
    pairs = masked[:, 1:-1].reshape(8, 200, 2)
    assert (pairs[..., 0] == pairs[..., 1]).all()  # both tokens of a word, or neither
    replaced = (input_ids == 3) & masked
    assert 0.7 < replaced.sum() / masked.sum() < 0.9
    original = torch.tensor([ids] * 8)
    assert (labels[masked] == original[masked]).all()
    again = mask_batch([(ids, words)] * 8, {1, 2}, 3, vocabulary, 0.15, random.Random(0))
    assert (again[2] == labels).all() and attention.sum() == 8 * len(ids)


def pretrain_config(tiny_encoder, corpus, home, *extra):
    return load_config(
        None,
        [
            f"model.name={tiny_encoder}",
            f"pretrain.paths=[{corpus}]",
            f"registry.home={home}",
            "name=toy-mlm",
            "pretrain.block_size=32",
            "pretrain.batch_size=8",
            "pretrain.lr=1e-3",
            "pretrain.epochs=4",
            "pretrain.threads=1",
            *extra,
        ],
        PretrainRecipe,
    )


def test_mlm_lowers_the_loss_and_registers_an_encoder_train_can_start_from(tiny_encoder, tmp_path, home, toy_csv):
    config = pretrain_config(tiny_encoder, corpus_file(tmp_path), home)
    outcome = mlm.run(config, show_progress=False)
    history = outcome.history
    assert len(history) == 4 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["heldout_perplexity"] == pytest.approx(math.exp(history[-1]["heldout_loss"]))
    assert outcome.version.ref == "toy-mlm@1" and outcome.version.metrics["kind"] == "encoder"
    result = CliRunner().invoke(
        app,
        [
            "train",
            f"data.path={toy_csv}",
            "model.name=toy-mlm@1",
            "name=toy",
            "train.epochs=1",
            "model.max_length=32",
            "train.threads=1",
            "serving.runtime=torch",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((home / "models" / "toy" / "v1" / "report.json").read_text())
    assert report["base_model"] == "toy-mlm@1"


def test_an_interrupted_run_resumes_exactly(tiny_encoder, tmp_path, home):
    config = pretrain_config(
        tiny_encoder, corpus_file(tmp_path), home, "pretrain.epochs=2", "pretrain.checkpoint_every=3"
    )
    straight = mlm.run(config, register=False, show_progress=False)

    class Crash(Exception):
        pass

    def crash(state):
        if state["global_step"] == 5:
            raise Crash

    with pytest.raises(Crash):
        mlm.run(config, register=False, show_progress=False, step_callback=crash)
    resumed = mlm.run(config, resume="latest", register=False, show_progress=False)
    assert resumed.folder != straight.folder
    for key in ("heldout_loss", "train_loss"):
        assert [h[key] for h in resumed.history] == pytest.approx([h[key] for h in straight.history], abs=1e-5)


@pytest.mark.parametrize("kind", ["wordpiece", "char"])
def test_from_scratch_tokenizer_round_trips_and_a_tiny_bert_trains(tmp_path, home, kind):
    texts = [r["text"] for r in toy_rows(20, topics={**TOPICS, **MOODS})] + ["我的快递还没到", "退款多久能到账"]
    tokenizer = train_tokenizer(texts, kind, 300, tmp_path / "tok")
    for text in ("my parcel is late", "我的快递还没到"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts), encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--data",
            str(corpus),
            "--from-scratch",
            "name=scratch",
            f"registry.home={home}",
            "pretrain.size=tiny",
            f"pretrain.tokenizer={kind}",
            "pretrain.block_size=32",
            "pretrain.batch_size=8",
            "pretrain.lr=5e-4",
            "pretrain.vocab_size=300",
            "pretrain.threads=1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "registered scratch@1" in result.output
    assert (home / "models" / "scratch" / "v1" / "model" / "config.json").is_file()


def test_sentencepiece_tokens_that_start_on_the_space_keep_to_their_word():
    """Regression: e5's "▁refund" starts on the space before the word, which jieba counts as a word."""
    text = "where is my refunds"
    offsets = [(0, 5), (5, 8), (8, 11), (11, 18), (18, 19)]  # ▁where ▁is ▁my ▁refund s
    words = word_numbers(text, offsets)
    assert words[3] == words[4] and len(set(words)) == 4


def test_from_scratch_encoders_take_texts_longer_than_the_pretraining_blocks():
    assert bert_config("tiny", 100).max_position_embeddings == 512


def test_pretraining_takes_the_gpu_settings_train_takes_and_refuses_what_this_machine_cannot_run(
    tiny_encoder, tmp_path, home, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = pretrain_config(tiny_encoder, corpus_file(tmp_path), home, "pretrain.device=cuda")
    with pytest.raises(TuneloopError, match=r"pretrain\.device=cuda, and torch sees no CUDA GPU"):
        mlm.run(config, show_progress=False)
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())  # refused before a run folder


def test_the_limited_output_layer_moves_with_the_model_and_is_not_saved_with_its_weights(tiny_encoder):
    from transformers import BertForMaskedLM

    head = mlm.CorpusVocabularyHead(BertForMaskedLM.from_pretrained(tiny_encoder), [5, 9, 12]).to("meta")
    assert head.position.device.type == "meta" and head.vocabulary.device.type == "meta"
    assert "position" not in head.state_dict()  # checkpoints stay as they were


def test_pretraining_in_bf16_autocast_lowers_the_loss(tiny_encoder, tmp_path, home):
    config = pretrain_config(tiny_encoder, corpus_file(tmp_path), home, "pretrain.precision=bf16")
    history = mlm.run(config, register=False, show_progress=False).history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
