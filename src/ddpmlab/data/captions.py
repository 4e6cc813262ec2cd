"""Captions of the digit pairs (data=digit_pairs): two digits side by side, said in many ways.

An item is the ordered pair (a, b): digit ``a`` on the left, digit ``b`` on the right, keyed ``10 * a + b``. Its
captions come from templates with synonyms, each digit written as a numeral or a word, in both word orders
("a 3 left of a 7", "seven to the right of three", "3 then 7"). Every template holds each digit exactly once and
its other words do not depend on the digits, and each caption of (a, b) has a twin of (b, a) made of the same
words: so a bag of words (a model that ignores word order, such as a pooled embedding of the caption) cannot tell
"3 left of 7" from "7 left of 3" -- only the order of the words can. Pure Python: the vocabulary is small and
closed (lowercase words, no punctuation).
"""

from __future__ import annotations

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {l}: the digit on the left, {r}: the digit on the right. The first is the canonical caption (evaluation and the
# grids print it); the others say the same in other words, half of them naming the right digit first. "After" and
# "before" are left out: "7 after 3" could as well mean the larger number.
TEMPLATES = (
    "a {l} left of a {r}",
    "{l} to the left of {r}",
    "a {l} with a {r} on its right",
    "a {l} on the left and a {r} on the right",
    "{l} then {r}",
    "{l} and then {r}",
    "{l} followed by {r}",
    "a {r} right of a {l}",
    "{r} to the right of {l}",
    "a {r} with a {l} on its left",
    "a {r} on the right and a {l} on the left",
    "{r} next to {l} on its left",
)


def pair_key(a: int, b: int) -> int:
    """The key of the ordered pair: ``a`` on the left, ``b`` on the right (0..99)."""
    return 10 * a + b


def pair_of(key: int) -> tuple[int, int]:
    """(left digit, right digit) of a key."""
    return divmod(int(key), 10)


def pair_captions(a: int, b: int) -> list[str]:
    """Every caption of digit ``a`` on the left and digit ``b`` on the right: each template with each digit as a
    numeral or a word (four ways). Element 0 is the canonical "a {a} left of a {b}" with numerals."""
    if not (0 <= a <= 9 and 0 <= b <= 9):
        raise ValueError(f"digits run from 0 to 9, got ({a}, {b})")
    spell = (str, DIGIT_WORDS.__getitem__)  # a numeral or a word
    return [template.format(l=left(a), r=right(b)) for template in TEMPLATES for left in spell for right in spell]
