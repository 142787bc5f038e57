"""Shared fixtures: a tiny random BERT and a toy labelled dataset, built in seconds."""

from __future__ import annotations

import gc
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from helpers import (
    MOODS,
    NO_POSTGRES,
    POSTGRES_URL,
    TOY_PAIRS,
    copy_rows,
    drop_test_database,
    server_settings,
    tiny_config,
    toy_rows,
)


@pytest.fixture(autouse=True)
def _nothing_stays_frozen():
    """A server freezes what it loaded out of the garbage collector (serve.app.keep_out_of_collections); in a test
    process that starts many servers, what a finished test left frozen would never be collected."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with a WordPiece vocabulary trained on the toy words."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    # A fixed, sorted vocabulary rather than a trained one: the tokenizers trainer numbers tokens of equal
    # frequency differently in every process, which made the tiny model (and tests on its accuracy) vary.
    corpus = [r["text"] for r in toy_rows(40) + toy_rows(40, topics=MOODS)] + ["where is 我的 快递 退款 密码"]
    words = sorted({word for text in corpus for word in text.lower().split() if word.isascii()})
    characters = sorted({c for text in corpus for c in text.lower() if not c.isspace()})
    pieces = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *words,
        *dict.fromkeys(characters + [f"##{c}" for c in characters if c.isascii()]),
    ]
    tokenizer = Tokenizer(
        models.WordPiece({piece: i for i, piece in enumerate(dict.fromkeys(pieces))}, unk_token="[UNK]")
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def toy_csv(tmp_path) -> Path:
    path = tmp_path / "toy.csv"
    pd.DataFrame(toy_rows()).to_csv(path, index=False)
    return path


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("TUNELOOP_HOME", str(folder))
    return folder


@pytest.fixture()
def tiny_overrides(tiny_encoder, toy_csv, home) -> list[str]:
    """Overrides that make any training command fast on the tiny model and toy data."""
    return [
        f"model.name={tiny_encoder}",
        f"data.path={toy_csv}",
        f"registry.home={home}",
        "train.epochs=2",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.head_lr=1e-2",
        "model.max_length=32",
        "name=toy",
        "train.threads=1",
        "train.patience=5",
        "serving.runtime=torch",  # ONNX export and the int8 check have tests of their own
        # The toy task's dozen texts per label would take the few-shot regime: tests/training/test_few_shot.py has it.
        "train.few_shot.mode=off",
    ]


@pytest.fixture(scope="session")
def production_home(tiny_encoder, tmp_path_factory) -> Path:
    """A home with toy@1 trained on the toy task and promoted; copy it before changing anything."""
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    folder = tmp_path_factory.mktemp("production")
    data = folder / "toy.csv"
    pd.DataFrame(toy_rows(per_label=40, seed=3)).to_csv(data, index=False)
    config = tiny_config(tiny_encoder, data, folder / "home")
    outcome = classification.run(config, show_progress=False)
    Registry(config.registry).promote(outcome.version.ref)
    return folder


@pytest.fixture()
def served(production_home, tmp_path):
    """(server settings, home) over a private copy of the production home."""
    shutil.copytree(production_home, tmp_path / "copy")
    home = tmp_path / "copy" / "home"
    return server_settings(home), home


@dataclass(frozen=True)
class DatabaseUnderTest:
    kind: str
    url: str | None  # None: SQLite in the home, the default

    def url_for(self, home: Path) -> str:
        return self.url or f"sqlite:///{(home / 'registry.db').resolve()}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request, monkeypatch):
    """A test that asks for this runs on SQLite and again on a fresh PostgreSQL database, whose URL is also
    TUNELOOP_DATABASE_URL for every config the test builds (skipped, with the reason, without a server)."""
    monkeypatch.delenv("TUNELOOP_DATABASE_URL", raising=False)
    if request.param == "sqlite":
        yield DatabaseUnderTest("sqlite", None)
        return
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    from sqlalchemy import create_engine, make_url, text

    name = f"tl_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"create database {name}"))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv("TUNELOOP_DATABASE_URL", url)
    yield DatabaseUnderTest("postgresql", url)
    drop_test_database(admin, name)
    admin.dispose()


@pytest.fixture()
def served_on_each_database(served, database):
    """`served` on SQLite, then with its registry moved to a fresh PostgreSQL database."""
    config, home = served
    if database.url is None:
        return config, home
    copy_rows(f"sqlite:///{home / 'registry.db'}", database.url)
    return server_settings(home, f"registry.database_url={database.url}"), home


ASSISTANT_YAML = """
name: shop
intent_model: toy
sentiment_model: mood
faq: faq.csv
out_of_scope_examples: out_of_scope.csv
retrieval:
  encoder: {encoder}
  min_similarity: 0.5
templates:
  intents:
    refund: {{en: "Refunds take a few days.", zh: "退款需要几天。"}}
    delivery: {{en: "Your parcel is on its way.", zh: "包裹正在路上。"}}
"""


@pytest.fixture(scope="session")
def assistant_template(production_home, tiny_encoder, tmp_path_factory) -> Path:
    """production_home plus a tiny sentiment model 'mood', a toy FAQ and an assistant definition."""
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    folder = tmp_path_factory.mktemp("assistant")
    shutil.copytree(production_home, folder, dirs_exist_ok=True)
    home = folder / "home"
    pd.DataFrame(toy_rows(per_label=40, seed=5, topics=MOODS)).to_csv(folder / "mood.csv", index=False)
    config = tiny_config(tiny_encoder, folder / "mood.csv", home, "name=mood")
    Registry(config.registry).promote(classification.run(config, show_progress=False).version.ref)
    pd.DataFrame(
        [
            {
                "question": "how long does a refund take",
                "answer": "Refunds reach your card in 5-7 days.",
                "intent": "refund",
                "lang": "en",
            },
            {
                "question": "where is my parcel delivery",
                "answer": "Track it on the My Orders page.",
                "intent": "delivery",
                "lang": "en",
            },
            {"question": "退款 多久", "answer": "退款5-7天到账。", "intent": "refund", "lang": "zh"},
        ]
    ).to_csv(folder / "faq.csv", index=False)
    pd.DataFrame(
        {
            "text": [
                "weather tomorrow",
                "football score tonight",
                "tell me a joke",
                "stock tips",
                "recipe for soup",
                "movie tonight",
            ]
        }
    ).to_csv(folder / "out_of_scope.csv", index=False)
    (folder / "assistant.yaml").write_text(ASSISTANT_YAML.format(encoder=tiny_encoder))
    return folder


@pytest.fixture()
def assistant_setup(assistant_template, tmp_path):
    """(server settings, definition path) over a private copy of the assistant template."""
    shutil.copytree(assistant_template, tmp_path / "shop")
    return server_settings(tmp_path / "shop" / "home"), tmp_path / "shop" / "assistant.yaml"


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama with a word-level tokenizer and a ChatML chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    words = " ".join(q + " " + a for q, a in TOY_PAIRS) + " system user assistant you are a helpful shop"
    tokenizer.train_from_iterator(
        [words], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "reply": a}) + "\n" for q, a in TOY_PAIRS * 6), encoding="utf-8")
    return path


# A tier that cannot run here is named at the end of the run with the command that enables it (make test's
# promise): the words its skip reason contains, and what to do.
SKIPPED_TIERS = {
    "browser": ("chromium", "apt-get install chromium (make test does it when run as root)"),
    "PostgreSQL": (
        "TUNELOOP_TEST_DATABASE_URL",
        "make postgres (as root), then export the TUNELOOP_TEST_DATABASE_URL it prints (make test does both as root)",
    ),
}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        tier = next((name for name, (words, _) in SKIPPED_TIERS.items() if words in reason), reason)
        counts[tier] = counts.get(tier, 0) + 1
    if not counts:
        return
    terminalreporter.section("skipped tiers")
    for tier, count in counts.items():
        how = SKIPPED_TIERS[tier][1] if tier in SKIPPED_TIERS else "see the reason"
        terminalreporter.write_line(f"{tier}: {count} tests skipped; to run them: {how}")
