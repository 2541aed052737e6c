import pytest

from tidal.config.schema import FilterConfig
from tidal.data.curate.filters import quality_reason
from tidal.data.curate.normalize import dedup_key, normalize
from tidal.data.curate.pii import luhn_ok, scrub

ALL = ["email", "phone", "ip", "credit_card", "secret"]
GOOD = ("The committee met on Tuesday to review the budget for the coming year. After a long "
        "discussion, the members agreed that the library would receive more money, and that the "
        "old bridge over the river should be repaired before the winter. Everyone was pleased "
        "with the outcome, although some wanted the decision to be made sooner.")


def test_normalize():
    raw = "Cafe\u0301\r\nline\ttwo\x00  with   spaces \u200b\r\n\r\n\r\n\r\nend  "
    assert normalize(raw) == "Café\nline two with spaces\n\nend"
    assert normalize("e\u0301") == "\u00e9"  # NFC
    assert dedup_key("Hello   World\n") == dedup_key("hello world")


def test_good_prose_passes():
    assert quality_reason(GOOD, FilterConfig()) == ""


@pytest.mark.parametrize("text, reason", [
    ("Too short to keep.", "too_few_words"),
    (" ".join(["a b c d"] * 30), "mean_word_length"),
    (" ".join(["#tag the word and"] * 20), "symbol_ratio"),
    ("\n".join(f"- item number {i} of the list and more" for i in range(30)), "bullet_lines"),
    ("\n".join(f"the story goes on and on through the long night until {i} in the morning..."
               for i in range(30)), "ellipsis_lines"),
    ("\n".join(["the same line is here again and again"] * 10 + [GOOD]), "duplicate_lines"),
    (" ".join(["buy now"] * 40) + " " + GOOD, "top_ngram_repetition"),
    ("zebra quartz vortex jumping flywheel mango kiwi papaya guava lychee apple banana cherry "
     "dragonfruit elderberry fig grape honeydew jackfruit kumquat lemon lime", "no_stop_words"),
    (GOOD + " Lorem ipsum dolor sit amet.", "boilerplate"),
    (GOOD + "\nThis website uses cookies to improve your experience.", "boilerplate"),
])
def test_each_filter_catches_its_case(text, reason):
    assert quality_reason(text, FilterConfig()) == reason


def test_repetition_of_5grams():
    para = ("one of the days the man walked to the old mill by the river and then went home "
            "again to sleep ")
    assert quality_reason(para * 4, FilterConfig(max_top_ngram_fraction=1.0)) == "duplicate_ngrams"


def test_thresholds_come_from_config():
    short = "A short but perfectly fine sentence about the weather and the sea."
    assert quality_reason(short, FilterConfig()) == "too_few_words"
    assert quality_reason(short, FilterConfig(min_words=5)) == ""
    greek = "Η επιτροπή συνεδρίασε την Τρίτη για να εξετάσει τον προϋπολογισμό " * 5 + GOOD[:40]
    lenient = dict(min_stop_words=0, max_dup_ngram_fraction=1.0, max_top_ngram_fraction=1.0)
    assert quality_reason(greek, FilterConfig(**lenient)) == ""
    assert quality_reason(greek, FilterConfig(min_script_fraction=0.8, **lenient)) == "script"


def test_end_punctuation_filter_is_optional():
    lines = "\n".join(f"menu entry {i} for the home page of the site" for i in range(10))
    lenient = dict(max_dup_ngram_fraction=1.0, max_top_ngram_fraction=1.0)
    assert quality_reason(lines, FilterConfig(**lenient)) == ""
    assert quality_reason(lines, FilterConfig(min_end_punct_line_fraction=0.5, **lenient)) \
        == "end_punctuation"


def test_email_including_inside_code_but_not_decorators():
    code = 'AUTHOR = "jane.doe+ml@example.co.uk"  # contact\n@property\ndef f(a, b): return a@b'
    out, counts = scrub(code, ALL)
    assert '"<EMAIL>"' in out and "@property" in out and "a@b" in out
    assert counts == {"email": 1}


def test_phone_numbers_but_not_dates_or_versions():
    out, counts = scrub("Call +1 (415) 555-0132 or 020 7946 0958 today.", ALL)
    assert out == "Call <PHONE> or <PHONE> today." and counts == {"phone": 2}
    for text in ("Released 2023-10-05.", "On 12/31/2024 we met.", "Version 3.11.7 is out.",
                 "In 1999 there were 2000 people."):
        assert scrub(text, ALL) == (text, {}), text


def test_credit_cards_need_luhn():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    out, counts = scrub("card 4111 1111 1111 1111 and 4111-1111-1111-1112", ALL)
    assert out == "card <CREDIT_CARD> and 4111-1111-1111-1112" and counts == {"credit_card": 1}


def test_ip_addresses():
    out, counts = scrub("hosts 192.168.1.20, 2001:db8::8a2e:370:7334 and ::1; not 999.1.1.1 "
                        "or 10:30", ALL)
    assert out.startswith("hosts <IP_ADDRESS>, <IP_ADDRESS> and")
    assert "999.1.1.1" in out and "10:30" in out and counts["ip"] >= 2


def test_secrets_and_selected_types_only():
    text = "key AKIAIOSFODNN7EXAMPLE token ghp_" + "a" * 36 + " mail me@example.org"
    out, counts = scrub(text, ["secret"])
    assert out == "key <SECRET> token <SECRET> mail me@example.org"
    assert counts == {"secret": 2}


def test_numbers_that_are_not_pii_stay():
    for text in ("Population 10 000 000 in the census.", "It cost 12.345.678 lire.",
                 "The years 1990 2000 2010 were good.", "Scores 2021 2022 2023 2024 in order."):
        assert scrub(text, ALL) == (text, {}), text


def test_ipv4_at_the_end_of_a_sentence_and_private_key_blocks():
    out, counts = scrub("Connect to 10.0.0.1. Then stop.", ALL)
    assert out == "Connect to <IP_ADDRESS>. Then stop." and counts == {"ip": 1}
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAAAA==\n-----END RSA PRIVATE KEY-----"
    out, counts = scrub(f"key:\n{key}\ndone", ALL)
    assert out == "key:\n<SECRET>\ndone" and counts == {"secret": 1}


def test_normalize_keeps_code_indentation():
    code = "def f(x):\n\tif x:\n        return   x  \n"
    assert normalize(code) == "def f(x):\n    if x:\n        return x"


def test_text_without_words_is_dropped_not_a_crash():
    assert quality_reason("--- *** ---", FilterConfig(min_words=0)) == "too_few_words"
