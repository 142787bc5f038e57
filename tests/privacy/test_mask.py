"""Personal data is masked before anything is written: measured on a labelled set of English and Chinese
messages (bench/data/pii_messages.jsonl), and checked where tuneloop writes texts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from tuneloop.config import DataConfig, PrivacyConfig
from tuneloop.data.clean import clean_text
from tuneloop.data.prepare import prepare_data
from tuneloop.feedback.log import LoggedPrediction, PredictionLog
from tuneloop.privacy.mask import PII_TYPES, find_pii, mask_text, masked_for_keeping, masker
from tuneloop.serve.app import create_app

LABELLED = Path(__file__).parents[2] / "bench" / "data" / "pii_messages.jsonl"


def labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_every_kind_of_personal_data_in_the_labelled_set_is_found_and_nothing_else():
    rows = labelled()
    assert {kind for row in rows for kind, _ in row["pii"]} == set(PII_TYPES)
    assert sum(not row["pii"] for row in rows) >= 40  # order numbers, amounts, dates in both languages
    missed, extra = [], []
    for row in rows:
        found = [(f.kind, row["text"][f.start : f.end]) for f in find_pii(row["text"])]
        wanted = [tuple(pair) for pair in row["pii"]]
        missed += [pair for pair in wanted if pair not in found]
        extra += [pair for pair in found if pair not in wanted]
    assert missed == [] and extra == []


@pytest.mark.parametrize(
    "text, masked",
    [
        ("mail jane@example.com or call (212) 555-0147", "mail [EMAIL] or call [PHONE]"),
        ("我的手机是138 0013 8000，邮箱 wang@qq.com", "我的手机是[PHONE]，邮箱 [EMAIL]"),
        (
            "订单号 202311051234，金额 ¥1,299.00，日期 2023年11月5日",
            "订单号 202311051234，金额 ¥1,299.00，日期 2023年11月5日",
        ),
        (
            "card 4111 1111 1111 1112 is not a card: its Luhn sum is wrong",
            "card 4111 1111 1111 1112 is not a card: its Luhn sum is wrong",
        ),
    ],
)
def test_masking_replaces_each_piece_by_its_placeholder(text, masked):
    assert mask_text(text) == masked


@pytest.mark.parametrize(
    "text, masked",
    [
        # Spans stop where the value stops: at Chinese text and at a sentence's full stop.
        ("链接 https://shop.example.com/reset?token=abc123之后页面打不开", "链接 [URL]之后页面打不开"),
        ("open https://shop.example.com/login?auth=7d1e9b.", "open [URL]."),
        # Links that carry somebody's token in the path, or a user or event in the parameters.
        (
            "activate at https://shop.example.com/activate/3f2b8c1e-9a4d-4e6b-8f7a-2c5d9e1b0a44 now",
            "activate at [URL] now",
        ),
        ("tracking link https://mail.example.com/t?uid=88231&event=open", "tracking link [URL]"),
        ("我的账户GB82WEST12345698765432请退款", "我的账户[IBAN]请退款"),  # an IBAN right against Chinese
        ("call +44 (0)7700 900872 tonight", "call [PHONE] tonight"),  # the trunk prefix in brackets
        ("we run version 4.2.1.7 now", "we run version 4.2.1.7 now"),  # versions are never addresses
        ("固件版本V1.0.2.15升级失败", "固件版本V1.0.2.15升级失败"),
        ("blocked from 203.0.113.5.", "blocked from [IP]."),  # a documentation-range address ending a sentence
        ("订单号 010-8251-3344 还没到", "订单号 010-8251-3344 还没到"),  # a dashed order number, not a phone
        ("card 30569309025904 was declined", "card [CARD] was declined"),  # Diners: issuers beyond Visa and Mastercard
    ],
)
def test_the_failure_kinds_an_independent_test_found(text, masked):
    """The kinds of failure the second security review's independent messages showed (not its texts)."""
    assert mask_text(text) == masked


def test_only_the_asked_kinds_are_masked_and_none_means_no_work():
    text = "jane@example.com, 203.0.113.45"
    assert mask_text(text, ["ip"]) == "jane@example.com, [IP]"
    assert masker(PrivacyConfig(mask=[])) is None


def test_a_text_with_more_digits_than_the_phone_rules_read_is_masked_by_the_cheap_rule(monkeypatch):
    """Review finding M5: libphonenumber's matcher read every digit of any text, and its cost grows faster than
    the digits (a 2,000-character "1/1/1/..." took about 100 ms), so one request of long number-heavy texts held
    the log's writer for seconds. Past PHONE_RULES_MAX_DIGITS it is never run; the long numbers are masked."""
    from tuneloop.privacy import mask

    read = []
    real_matcher = mask.phonenumbers.PhoneNumberMatcher
    monkeypatch.setattr(
        mask.phonenumbers, "PhoneNumberMatcher", lambda text, *a, **k: read.append(text) or real_matcher(text, *a, **k)
    )
    hostile = "1/" * 1000
    log_lines = "call me on 020 7946 0958; " + "; ".join(f"{n:08d}" for n in range(40)) + "; order 12 345"
    assert mask_text(hostile) == "[PHONE]/" and read == []
    assert mask_text(log_lines) == "call me on [PHONE]; " + "; ".join(["[PHONE]"] * 40) + "; order 12 345"
    assert read == []
    assert mask_text("call me on 020 7946 0958") == "call me on [PHONE]" and read  # a message: the full rules


def test_prepared_training_data_never_holds_the_personal_data(tmp_path):
    rows = [{"text": f"refund for order {i}, mail me at buyer{i}@example.com", "label": "refund"} for i in range(20)]
    rows += [{"text": f"parcel {i} is late, call +44 20 7946 09{i:02d}", "label": "delivery"} for i in range(20)]
    pd.DataFrame(rows).to_csv(tmp_path / "data.csv", index=False)
    prepared = prepare_data(DataConfig(path=tmp_path / "data.csv"), mask=masker(PrivacyConfig()))
    texts = " ".join(pd.concat([split["text"] for split in prepared.splits.values()]))
    assert "@example.com" not in texts and "7946" not in texts and "[EMAIL]" in texts and "[PHONE]" in texts
    assert prepared.report["texts_with_personal_data_masked"] == 40


def test_the_server_keeps_predictions_turns_and_comments_masked(assistant_setup):
    config, definition = assistant_setup
    config.serve.assistant = definition
    with TestClient(create_app(config)) as client:
        said = "refund to card 4526 0181 5908 3012 please, jane@example.com"
        prediction = client.post("/v1/predict", json={"texts": [said], "model": "toy"}).json()["predictions"][0]
        comment = {"prediction_id": prediction["prediction_id"], "rating": -1, "comment": "call me: +1 646 555 0123"}
        assert client.post("/v1/feedback", json=comment).status_code == 201
        turn = client.post("/v1/chat", json={"message": "my email is li.wei@example.cn, where is my refund"}).json()
        stored_turn = client.app.state.tuneloop.conversations.get(turn["turn_id"])
    assert stored_turn.message == "my email is [EMAIL], where is my refund"
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    try:
        [(feedback, stored)] = [row for row in log.feedback_for("toy") if row[1].id == prediction["prediction_id"]]
        assert stored.text == "refund to card [CARD] please, [EMAIL]" and feedback.comment == "call me: [PHONE]"
        chat_prediction = log.get(stored_turn.intent_prediction_id)
        assert chat_prediction.text == "my email is [EMAIL], where is my refund"
    finally:
        log.close()


DISGUISED = (
    "refund alice&#64;example.com, card 4111\u00ad1111\u00ad1111\u00ad1111, iban <b>GB82 WEST</b> 1234 5698 7654 32"
)


def test_personal_data_that_cleaning_reveals_is_masked_where_it_is_kept(assistant_setup):
    """An entity-escaped address and a card cut by soft hyphens passed the masker and became plain data once
    cleaned, as training reads them (the review's M1): what is kept is the cleaned text, masked."""
    config, definition = assistant_setup
    config.serve.assistant = definition
    with TestClient(create_app(config)) as client:
        prediction = client.post("/v1/predict", json={"texts": [DISGUISED], "model": "toy"}).json()["predictions"][0]
        comment = {"prediction_id": prediction["prediction_id"], "rating": -1, "comment": "bob&#64;example.org"}
        assert client.post("/v1/feedback", json=comment).status_code == 201
        turn = client.post("/v1/chat", json={"message": DISGUISED}).json()
        stored_turn = client.app.state.tuneloop.conversations.get(turn["turn_id"])
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    try:
        [(feedback, stored)] = [row for row in log.feedback_for("toy") if row[1].id == prediction["prediction_id"]]
    finally:
        log.close()
    for kept in (stored.text, stored_turn.message, feedback.comment):
        revealed = clean_text(kept)
        assert "@example" not in revealed and "4111" not in revealed and "GB82" not in revealed, kept
    assert stored.text == "refund [EMAIL], card [CARD], iban [IBAN]"


# The same pieces escaped once more, or many times (cleaning decodes one level of entities each time it runs).
ESCAPED_TWICE = "alice&amp;#64;example.com 4111&amp;shy;1111&amp;shy;1111&amp;shy;1111"
ESCAPED_AGAIN = ESCAPED_TWICE + " bob&" + "amp;" * 9 + "#64;x.org"


def test_personal_data_escaped_more_than_once_is_masked_where_it_is_kept(assistant_setup):
    """Cleaning before masking undid one level of escaping; every reader cleans the kept text again (the review
    queue, exports, retraining, the recipe), each decoding one more level, so an address escaped twice became plain
    data the first time it was read back. Kept texts must stay free of it however often they are cleaned."""
    config, definition = assistant_setup
    config.serve.assistant = definition
    with TestClient(create_app(config)) as client:
        prediction = client.post("/v1/predict", json={"texts": [ESCAPED_AGAIN], "model": "toy"}).json()
        prediction_id = prediction["predictions"][0]["prediction_id"]
        comment = {"prediction_id": prediction_id, "rating": -1, "comment": "bob&amp;#64;example.org"}
        assert client.post("/v1/feedback", json=comment).status_code == 201
        turn = client.post("/v1/chat", json={"message": ESCAPED_TWICE}).json()  # the toy encoder reads 64 tokens
        stored_turn = client.app.state.tuneloop.conversations.get(turn["turn_id"])
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    try:
        [(feedback, stored)] = [row for row in log.feedback_for("toy") if row[1].id == prediction_id]
    finally:
        log.close()
    for kept in (stored.text, stored_turn.message, feedback.comment):
        revealed = kept
        for _ in range(10):
            revealed = clean_text(revealed)
            assert "@example" not in revealed and "4111" not in revealed and "@x.org" not in revealed, kept
    assert stored.text.startswith("[EMAIL] [CARD] bob")


def test_a_text_plain_under_cleaning_is_kept_as_cleaned_once():
    """Only a text whose further cleaning reveals something is kept further cleaned: "&lt;b&gt;" in a message stays
    the text the user wrote."""
    assert masked_for_keeping("use &lt;b&gt; for bold", mask_text, clean_text) == "use <b> for bold"
    assert masked_for_keeping("mail alice&amp;#64;example.com", mask_text, clean_text) == "mail [EMAIL]"


def test_a_rescue_file_holds_the_masked_texts_too(tmp_path):
    log = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", tmp_path, flush_ms=60_000, mask=masker(PrivacyConfig()))
    log.start()
    with log.engine.begin() as connection:
        connection.execute(text("DROP TABLE feedback"))
        connection.execute(text("DROP TABLE predictions"))
    log.record(
        [LoggedPrediction.of("m", 1, ["a", "b"], "call 13812345678", np.array([0.9, 0.1]), "api", datetime.now(UTC))]
    )
    log.close()  # the database is gone: the row goes to a rescue file
    [rescue] = tmp_path.glob("unsaved-predictions-*.jsonl")
    assert json.loads(rescue.read_text())["text"] == "call [PHONE]"


def test_pretraining_corpora_and_reply_pairs_are_masked_as_they_are_read(tmp_path):
    from tuneloop.training.mlm import read_corpus
    from tuneloop.training.sft import read_conversations

    mask = masker(PrivacyConfig())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("write to jane@example.com\n我的手机是13812345678\n", encoding="utf-8")
    assert read_corpus([corpus], "text", mask) == ["write to [EMAIL]", "我的手机是[PHONE]"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "card 4526 0181 5908 3012 was charged", "reply": "We called you on +1 646 555 0123."})
        + "\n",
        encoding="utf-8",
    )
    [conversation] = read_conversations([pairs], None, mask)
    assert [m["content"] for m in conversation] == ["card [CARD] was charged", "We called you on [PHONE]."]
