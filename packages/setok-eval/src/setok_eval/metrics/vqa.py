"""VQA accuracy with the official VQAv2 evaluation rule, and exact match (GQA, VSR, IconQA).

The normalisation reproduces the official script's behaviour, quirks included, because
published numbers were produced by it: see `normalize_vqa_answer` and `vqa_accuracy`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Spelled-out numbers (and "none") become digits.
_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contraction table of the official script, written as "canonical form: variants it absorbs".
# Keys of the official map are the variants; the canonical form is what a word becomes.
_CONTRACTION_GROUPS: dict[str, tuple[str, ...]] = {
    "ain't": ("aint",),
    "aren't": ("arent",),
    "can't": ("cant",),
    "could've": ("couldve",),
    "couldn't": ("couldnt",),
    "couldn't've": ("couldn'tve", "couldnt've"),
    "didn't": ("didnt",),
    "doesn't": ("doesnt",),
    "don't": ("dont",),
    "hadn't": ("hadnt",),
    "hadn't've": ("hadnt've", "hadn'tve"),
    "hasn't": ("hasnt",),
    "haven't": ("havent",),
    "he'd": ("hed",),
    "he'd've": ("hed've", "he'dve"),
    "he's": ("hes",),
    "how'd": ("howd",),
    "how'll": ("howll",),
    "how's": ("hows",),
    "I'd've": ("Id've", "I'dve"),
    "I'm": ("Im",),
    "I've": ("Ive",),
    "isn't": ("isnt",),
    "it'd": ("itd",),
    "it'd've": ("itd've", "it'dve"),
    "it'll": ("itll",),
    "let's": ("let's",),
    "ma'am": ("maam",),
    "mightn't": ("mightnt",),
    "mightn't've": ("mightnt've", "mightn'tve"),
    "might've": ("mightve",),
    "mustn't": ("mustnt",),
    "must've": ("mustve",),
    "needn't": ("neednt",),
    "not've": ("notve",),
    "o'clock": ("oclock",),
    "oughtn't": ("oughtnt",),
    "'ow's'at": ("ow's'at", "'ows'at", "'ow'sat"),
    "shan't": ("shant",),
    "she'd've": ("shed've", "she'dve"),
    "she's": ("she's",),
    "should've": ("shouldve",),
    "shouldn't": ("shouldnt",),
    "shouldn't've": ("shouldnt've", "shouldn'tve"),
    # The official table maps this one backwards (with apostrophe -> without); kept as is.
    "somebodyd": ("somebody'd",),
    "somebody'd've": ("somebodyd've", "somebody'dve"),
    "somebody'll": ("somebodyll",),
    "somebody's": ("somebodys",),
    "someone'd": ("someoned",),
    "someone'd've": ("someoned've", "someone'dve"),
    "someone'll": ("someonell",),
    "someone's": ("someones",),
    "something'd": ("somethingd",),
    "something'd've": ("somethingd've", "something'dve"),
    "something'll": ("somethingll",),
    "that's": ("thats",),
    "there'd": ("thered",),
    "there'd've": ("thered've", "there'dve"),
    "there're": ("therere",),
    "there's": ("theres",),
    "they'd": ("theyd",),
    "they'd've": ("theyd've", "they'dve"),
    "they'll": ("theyll",),
    "they're": ("theyre",),
    "they've": ("theyve",),
    "'twas": ("twas",),
    "wasn't": ("wasnt",),
    "we'd've": ("wed've", "we'dve"),
    "we've": ("weve",),
    "weren't": ("werent",),
    "what'll": ("whatll",),
    "what're": ("whatre",),
    "what's": ("whats",),
    "what've": ("whatve",),
    "when's": ("whens",),
    "where'd": ("whered",),
    "where's": ("wheres",),
    "where've": ("whereve",),
    "who'd": ("whod",),
    "who'd've": ("whod've", "who'dve"),
    "who'll": ("wholl",),
    "who's": ("whos",),
    "who've": ("whove",),
    "why'll": ("whyll",),
    "why're": ("whyre",),
    "why's": ("whys",),
    "won't": ("wont",),
    "would've": ("wouldve",),
    "wouldn't": ("wouldnt",),
    "wouldn't've": ("wouldnt've", "wouldn'tve"),
    "y'all": ("yall",),
    "y'all'll": ("yall'll", "y'allll"),
    "y'all'd've": ("yall'd've", "y'alld've", "y'all'dve"),
    "you'd": ("youd",),
    "you'd've": ("youd've", "you'dve"),
    "you'll": ("youll",),
    "you're": ("youre",),
    "you've": ("youve",),
}
CONTRACTIONS: dict[str, str] = {
    variant: canonical
    for canonical, variants in _CONTRACTION_GROUPS.items()
    for variant in variants
}

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-")
_PUNCTUATION += (">", "<", "@", "`", ",", "?", "!")
# A period not followed by a digit. The official pattern also carries a mistyped look-behind
# ("(?!<=\d)") which is in fact a look-ahead for "<=digit"; it is reproduced verbatim.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official script passes re.UNICODE (= 32) where `count` goes, so at most 32 periods go.
_PERIOD_MAX_REPLACEMENTS = int(re.UNICODE)


def normalize_punctuation(text: str) -> str:
    """The official `processPunctuation`: drop or space out punctuation, strip periods."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REPLACEMENTS)


def normalize_digits_articles(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words to digits, drop articles,
    restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """Normalise a predicted answer exactly as the official VQAv2 script does."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    return normalize_digits_articles(normalize_punctuation(_clean_whitespace(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy of one prediction against the human answers (usually ten).

    The prediction is fully normalised; the ground-truth answers get punctuation
    normalisation only when they are not all identical (as in the official script). The
    score is the mean over leave-one-out subsets of min(#matches / 3, 1).
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError("answers must be a non-empty list of strings")
    pred = normalize_vqa_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [normalize_punctuation(a) for a in gts]
    total = 0.0
    for left_out in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != left_out and a == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


def normalize_short_answer(text: str) -> str:
    """Normalisation for exact-match benchmarks: trim, lowercase, drop one trailing period."""
    out = _clean_whitespace(text).lower()
    return out[:-1].rstrip() if out.endswith(".") else out


def exact_match(prediction: str, answer: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the (or any) normalised answer (GQA, VSR, IconQA)."""
    candidates = [answer] if isinstance(answer, str) else list(answer)
    if not candidates:
        raise ValueError("answer must be a string or a non-empty list of strings")
    pred = normalize_short_answer(prediction)
    return float(any(pred == normalize_short_answer(a) for a in candidates))
