"""The answer metrics of the paper's benchmarks: VQA accuracy, exact match, ANLS, relaxed accuracy.

Each metric scores one prediction against the reference answers of one question and returns a
float in [0, 1]; a benchmark's score is the mean over its questions. ``score`` dispatches on
the names ``atoll eval --metric`` accepts.

Example::

    >>> vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7)
    0.9
    >>> anls("Acme corp", ["ACME Corp."])
    0.9
    >>> relaxed_accuracy("10.4", ["10"])
    1.0
    >>> score("exact", "the cat", ["Cat"])
    1.0

What each follows:

* ``vqa``: the official VQAv2 evaluator (``vqaEval.py``): its answer normalisation, and
  ``min(#humans who gave the answer / 3, 1)`` averaged over the n leave-one-out subsets of the
  n human answers (the 10-choose-9 subsets for VQAv2). Two deliberate differences: the
  references are normalised like the prediction (VQAv2's were normalised when the dataset was
  built, other datasets' are not), and so is the prediction when all humans agree (the
  official script skips it then, scoring "Two" against ten "2"s as 0).
* ``exact``: 1 if the VQA-normalised prediction equals a VQA-normalised reference.
* ``anls``: DocVQA / InfographicVQA: per reference, ``1 - lev(p, a) / max(|p|, |a|)`` after
  lowercasing and collapsing whitespace, zeroed when the normalised distance is 0.5 or more;
  the best reference counts.
* ``relaxed``: ChartQA: numbers (``"12.5"``, ``"40%"`` = 0.4) within 5% relative change of the
  reference, otherwise a case-insensitive string match; the best reference counts. One
  difference from the reference implementation: a numeric reference of 0 is matched by any
  prediction equal to 0 ("0.0"), where that one compares strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from rapidfuzz.distance import Levenshtein

from protocol.errors import InvalidArgument

__all__ = [
    "METRICS",
    "anls",
    "exact_match",
    "normalize_vqa_answer",
    "relaxed_accuracy",
    "score",
    "vqa_accuracy",
]

Metric = Callable[[str, Sequence[str]], float]

# --- VQA answer normalisation (the official evaluator's tables and order of steps) --------

# The official table, kept as it is (including "somebody'd" -> "somebodyd" and the keys with
# capitals, which never match after lowercasing) so that scores equal the official ones.
_CONTRACTIONS: Final[Mapping[str, str]] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# "none" -> "0" is the official evaluator's choice: "how many ...?" "none" counts as 0.
_NUMBER_WORDS: Final[Mapping[str, str]] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

_ARTICLES: Final = frozenset({"a", "an", "the"})

# Apostrophes and colons are absent on purpose: contractions and times ("3:30") survive.
_PUNCTUATION: Final = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip

# The official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped as a look-ahead
# that always succeeds, so in effect a period goes unless a digit follows ("3.5" keeps it,
# "e.g." loses both). Reproduced as it behaves, not as it was meant.
_PERIOD: Final = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT: Final = re.compile(r"\d,\d")


def _strip_punctuation(text: str) -> str:
    # A mark touching a space is deleted ("yes, it is" -> "yes it is"), as is every mark in a
    # text holding a number like "1,000"; a mark inside a word becomes a space
    # ("black/white" -> "black white"). Decided on the original text, as the evaluator does.
    has_grouped_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or has_grouped_number:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """Normalises an answer the way the official VQAv2 evaluator does.

    Newlines and tabs become spaces; punctuation is removed or turned into spaces; then,
    lowercased word by word, number words become digits ("two" -> "2"), articles go, and
    contractions missing their apostrophe get it back ("dont" -> "don't").

    Args:
        text: A predicted or human answer.

    Returns:
        The normalised answer, words joined by single spaces.
    """
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


# --- metrics -----------------------------------------------------------------------------


def _check(prediction: str, answers: Sequence[str]) -> None:
    # A bare string is a Sequence[str] too: iterating it would score against its characters.
    if not isinstance(prediction, str):
        raise InvalidArgument(f"prediction: expected a string, got {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise InvalidArgument(
            f"answers: expected a list of reference strings, got {type(answers).__name__} "
            f"{answers!r:.60}"
        )
    if not answers:
        raise InvalidArgument("answers: expected at least one reference answer, got none")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise InvalidArgument(
                f"answers[{i}]: expected a string, got {type(answer).__name__} {answer!r:.60}"
            )


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: ``min(#humans who said it / 3, 1)``, averaged leave-one-out.

    For each of the n human answers, drop it and count how many of the other n - 1 equal the
    prediction (after normalisation); average ``min(count / 3, 1)`` over the n drops. With 10
    answers, matching 0, 1, 2, 3 or 4+ of them scores 0, 0.3, 0.6, 0.9, 1.

    Args:
        prediction: The model's answer.
        answers: The human answers (VQAv2 has 10). With a single answer there is nothing to
            leave out, and the score is its exact match.

    Returns:
        The accuracy in [0, 1].

    Raises:
        InvalidArgument: ``answers`` is empty, a bare string, or holds a non-string.
    """
    _check(prediction, answers)
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # Leaving out annotator i leaves total - matches[i] matching answers among the others.
    # Summed in integers (thirds) so that 3 of 10 gives exactly 0.9, not 0.9000000000000001.
    thirds = sum(min(3, total - left_out) for left_out in matches)
    return thirds / (3 * len(matches))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals any reference after VQA normalisation, else 0.0.

    Raises:
        InvalidArgument: ``answers`` is empty, a bare string, or holds a non-string.
    """
    _check(prediction, answers)
    predicted = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(answer) == predicted for answer in answers))


def _anls_normalize(text: str) -> str:
    return " ".join(text.lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one question (DocVQA, InfographicVQA).

    ``1 - lev(p, a) / max(|p|, |a|)`` for the best reference ``a``, or 0 when that normalised
    distance is ``threshold`` or more (a wrong answer, not a misread one). Both strings are
    lowercased with whitespace collapsed; two empty strings are identical.

    Args:
        prediction: The model's answer.
        answers: The accepted answers.
        threshold: The normalised distance from which a match scores 0, in (0, 1].

    Raises:
        InvalidArgument: Bad ``answers`` or a threshold outside (0, 1].
    """
    _check(prediction, answers)
    if not 0 < threshold <= 1:
        raise InvalidArgument(f"threshold: expected a value in (0, 1], got {threshold}")
    predicted = _anls_normalize(prediction)
    best = 0.0
    for answer in answers:
        reference = _anls_normalize(answer)
        longest = max(len(predicted), len(reference))
        distance = Levenshtein.distance(predicted, reference) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


def _to_number(text: str) -> float | None:
    # "40%" is 0.4, as ChartQA's reference implementation reads it; nan/inf are not numbers
    # that a relative tolerance can judge, so they fall back to string matching.
    text = text.strip()
    scale = 1.0
    if text.endswith("%"):
        text, scale = text[:-1], 0.01
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers within ``tolerance`` relative change, else exact.

    Args:
        prediction: The model's answer.
        answers: The accepted answers; the prediction counts if it matches any.
        tolerance: The largest accepted ``|prediction - answer| / |answer|``.

    Returns:
        1.0 or 0.0.

    Raises:
        InvalidArgument: Bad ``answers`` or a negative tolerance.
    """
    _check(prediction, answers)
    if tolerance < 0:
        raise InvalidArgument(f"tolerance: expected a value >= 0, got {tolerance}")
    predicted = _to_number(prediction)
    for answer in answers:
        reference = _to_number(answer)
        if predicted is not None and reference is not None:
            if reference == 0:
                correct = predicted == 0
            else:
                correct = abs(predicted - reference) / abs(reference) <= tolerance
        else:
            correct = prediction.strip().lower() == answer.strip().lower()
        if correct:
            return 1.0
    return 0.0


METRICS: Final[Mapping[str, Metric]] = {
    "vqa": vqa_accuracy,
    "exact": exact_match,
    "anls": anls,
    "relaxed": relaxed_accuracy,
}


def score(metric_name: str, prediction: str, answers: Sequence[str]) -> float:
    """Scores one prediction with the metric called ``metric_name`` (a key of ``METRICS``).

    Raises:
        InvalidArgument: An unknown metric name, or bad answers.
    """
    metric = METRICS.get(metric_name)
    if metric is None:
        raise InvalidArgument(
            f"unknown metric {metric_name!r}: expected one of {', '.join(sorted(METRICS))}"
        )
    return metric(prediction, answers)
