"""alignment.text_attributes: worked examples of every measure, on text a chat model really writes."""

import pytest

from alignment import text_attributes as ta

SMOL_LIST = """Here are some tips for better sleep:

1. **Keep a schedule**: go to bed at the same time every day.
2. **Limit screens**: avoid phones an hour before bed.
3. Don't drink coffee after 2 p.m.

Hope this helps!"""


def test_every_measure_of_a_markdown_list_reply():
    m = ta.measure_all(SMOL_LIST)
    assert m["list_items"] == 3 and m["formatting"] == 2  # two bold spans, no heading
    assert m["words"] == 37 and m["contractions"] == 1  # 7 + 12 + 8 + 7 + 3: "p.m." is two, "1." none; "Don't"
    assert m["exclamations"] == 1 and m["question_back"] == 0 and m["example"] == 0
    assert m["greeting_or_sign_off"] == 1  # the sign-off "Hope this helps!"
    assert m["summary_first"] == 1  # a short first line, then the list


def test_bullets_of_every_kind_and_what_is_not_a_list():
    assert ta.list_items("- one\n* two\n+ three\n• four\n– five\n1) six\n10. seven") == 7
    assert ta.list_items("-no space\n3.5 is a number\nnot a - list") == 0


def test_headings_and_bold():
    assert ta.formatting("# Title\n## Part\nSome __bold__ and **more**.\n#hashtag") == 4


def test_question_back_reads_the_end_only():
    assert ta.question_back("Paris is the capital. Have you been there?  \n") == 1
    assert ta.question_back("Why? Because it is.") == 0
    assert ta.question_back("?") == 0


def test_examples_contractions_and_unicode_apostrophes():
    text = "For example, it’s easy; e.g. you’ll see. Fruits such as apples. We’re done, isn't it?"
    assert ta.example(text) == 3
    assert ta.contractions(text) == 4  # it’s, you’ll, We’re, isn't
    assert ta.words("it’s you’ll") == ["it’s", "you’ll"]


def test_greeting_and_sign_off():
    assert ta.greeting_or_sign_off("Hello! Here it is. Cheers") == 2
    assert ta.greeting_or_sign_off("Hi there") == 1
    assert ta.greeting_or_sign_off("This is high quality.") == 0  # "high" is not "hi"


def test_second_person_share_and_sentence_length():
    assert ta.second_person("You should ask your doctor") == pytest.approx(2 / 5)
    assert ta.sentence_length("One two three. Four five!\n- six") == pytest.approx(2.0)  # 3, 2 and 1 words
    assert ta.sentences("1. Sleep early.\n2. Drink water.") == ["Sleep early", "Drink water"]


def test_summary_first_needs_a_short_first_line_and_more():
    assert ta.summary_first("Short answer: yes.\nBecause of reasons.") == 1
    assert ta.summary_first("Just one line.") == 0
    assert ta.summary_first("- a list item first\n- then another") == 0
    assert ta.summary_first(" ".join(["word"] * 25) + "\nmore") == 0


@pytest.mark.parametrize("text", ["", "   \n\t", "!!!", "…", "🙂"])
def test_empty_or_wordless_replies_measure_zero_or_their_marks(text):
    m = ta.measure_all(text)
    assert m["words"] == 0 and m["second_person"] == 0 and m["sentence_length"] == 0 and m["summary_first"] == 0
    assert m["exclamations"] == text.count("!")
    assert all(isinstance(v, float) for v in m.values())


def test_measures_are_deterministic_and_pure():
    assert ta.measure_all(SMOL_LIST) == ta.measure_all(SMOL_LIST)
    assert set(ta.MEASURES) == set(ta.measure_all("x"))
