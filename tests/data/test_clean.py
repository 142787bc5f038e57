from __future__ import annotations

from tuneloop.data.clean import cjk_share, clean_text, dedup_key


def test_html_tags_and_entities():
    assert clean_text("<b>Where</b> is my order&nbsp;#A5512?<br>thanks") == "Where is my order #A5512? thanks"


def test_escaped_markup_stays_text():
    assert clean_text("use &lt;b&gt; for bold") == "use <b> for bold"


def test_full_width_folds_to_ascii_but_chinese_is_kept():
    assert clean_text("ｗｈｅｒｅ ｉｓ ｍｙ ｒｅｆｕｎｄ？ 我的退款") == "where is my refund? 我的退款"


def test_zero_width_control_and_whitespace():
    assert clean_text("  re\u200bfund\tnow\x07 \n please\ufeff ") == "refund now please"


def test_dedup_key_ignores_case():
    assert dedup_key(clean_text("  Cancel  ORDER ")) == dedup_key("cancel order")


def test_cjk_share():
    assert cjk_share(["hello", "你好", "hi 世界", "x"]) == 0.5
    assert cjk_share([]) == 0.0
