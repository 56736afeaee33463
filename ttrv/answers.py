"""From a sampled response to a canonical answer that can be voted on.

Every canonical answer is a normalised string (`normalize_text`) or `INVALID`. Votes pool
equal strings, so the rules here decide what counts as "the same answer". Pure functions,
no torch.

Decisions (each one has a test):
- Multiple choice votes over option *contents*, not letters: "B" with options
  ("3", "7", ...) becomes "7", so rollouts shown the options in different orders pool.
- The reference code upper-cases the text and takes the last `\\b[A-D]\\b`, so the article
  in "It is a cat" becomes option A. Here "a", "A" and "I" followed on the same line by a
  word are English words, not letters ("a cat", "A dog", "I think"), unless the word is a
  verb that no article or "I" can precede ("A is correct"). A bare "a", "a." or "(a)" is
  option A: an article never stands alone. Every other single letter (B, c, ...) is a
  letter wherever it stands.
- Letter conflicts: a response that is only a letter or starts with one ("B. 7",
  "(B) seven", "A. cat") wins, then an option content stated as the whole response
  ("seven", "Vitamin C"), then the *last* explicit
  statement ("answer is C", "Answer: C", "option C"), then the *first* letter named
  (letters after "not" skipped). A letter beyond the options is INVALID.
- Mentions inside a sentence ("It is a cat.") count when exactly one option / class /
  yes-no word is named; a name inside a longer named option ("cat" in "black cat") does
  not count on its own. Two names -> INVALID.
- Free text (open, per_image) keeps the first line after a lead-in ("The answer is",
  "There are", ...), normalised and cut to `MAX_FREE_WORDS` words; a short answer holding
  exactly one number ("7 dogs", "seven") becomes that number.
- Reasoning in a closed `<think>...</think>` is dropped; an unclosed `<think>` is
  reasoning cut off before any answer, so the response is INVALID.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports ttrv.rewards, which imports this module
    from .config import TaskConfig

INVALID = "<invalid>"
MAX_FREE_WORDS = 10

# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


_ONES = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
)
_NUMBER_WORDS = {w: i for i, w in enumerate(_ONES)}
_TENS = {
    w: 10 * i
    for i, w in enumerate(_words("twenty thirty forty fifty sixty seventy eighty ninety"), 2)
}
_ARTICLES = {"a", "an", "the"}

# A number is a token of its own ("3d" and "v2" are words); a sign only at a token start.
_TOKEN = re.compile(r"(?<![^\W_])-?\d+(?:\.\d+)?(?![^\W_])|[^\W_]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "mice": "mouse",
    "geese": "goose",
    "feet": "foot",
    "teeth": "tooth",
    "oxen": "ox",
    "cacti": "cactus",
    "knives": "knife",
    "wives": "wife",
    "lives": "life",
    "leaves": "leaf",
    "loaves": "loaf",
    "wolves": "wolf",
    "shelves": "shelf",
    "halves": "half",
    "calves": "calf",
    "scarves": "scarf",
    "thieves": "thief",
    "elves": "elf",
}
# Words ending in s that are not plurals (beyond the -ss / -us / -is rule).
_NOT_PLURAL = set(
    _words(
        "always perhaps whereas news series species physics mathematics politics economics "
        "athletics gymnastics electronics lens chaos cosmos ethos kudos atlas canvas alias bias "
        "christmas pajamas pyjamas texas yes this thus"
    )
)
# Plurals of words ending in -s / -o / -ch that take "es" (everything else drops only "s").
_ES_PLURALS = set(
    _words(
        "buses gases lenses viruses bonuses campuses circuses cactuses atlases canvases walruses "
        "octopuses irises tomatoes potatoes heroes mangoes volcanoes echoes torpedoes mosquitoes "
        "buffaloes dominoes"
    )
)
# Singulars ending in -ie or -che, whose plural must not become -y / lose "es".
_IE_SINGULARS = set(
    _words(
        "movie cookie zombie brownie hoodie selfie rookie goalie genie collie calorie prairie "
        "smoothie budgie birdie pixie auntie necktie bowtie magpie pie tie lie die"
    )
)
_CHE_SINGULARS = set(_words("niche cache headache moustache mustache avalanche quiche"))


def _singular(word: str) -> str:
    """Conservative plural -> singular for one lowercase token; unknown cases are kept."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or not word.endswith("s") or not word.isalpha() or word in _NOT_PLURAL:
        return word
    if word in _ES_PLURALS:
        return word[:-2]
    if word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("sses") or word.endswith("xes"):
        return word[:-2]  # glasses, boxes
    if word.endswith(("ches", "shes")):
        return word[:-1] if word[:-1] in _CHE_SINGULARS else word[:-2]  # churches, dishes
    if word.endswith("ies") and len(word) > 4 and word[:-1] not in _IE_SINGULARS:
        return word[:-3] + "y"  # puppies
    return word[:-1]  # cats, horses, movies, shoes, photos


def _canonical_number(token: str) -> str:
    try:
        value = Decimal(token)
    except InvalidOperation:
        return token
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _merge_number_words(tokens: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in _TENS and 1 <= _NUMBER_WORDS.get(nxt, 0) <= 9:
            out.append(str(_TENS[tok] + _NUMBER_WORDS[nxt]))
            i += 2
            continue
        if tok in _TENS:
            out.append(str(_TENS[tok]))
        elif tok in _NUMBER_WORDS:
            out.append(str(_NUMBER_WORDS[tok]))
        else:
            out.append(tok)
        i += 1
    return out


def _is_number(token: str) -> bool:
    return bool(_NUMBER.fullmatch(token))


def normalize_text(s: str) -> str:
    """Lowercase words without punctuation, a leading article, plurals or number words.

    >>> normalize_text("The Cats!")
    'cat'
    >>> normalize_text("  Seven. ")
    '7'
    >>> normalize_text("7.0"), normalize_text("twenty-one boxes"), normalize_text("glass")
    ('7', '21 box', 'glass')
    >>> normalize_text("a")
    'a'
    """
    text = unicodedata.normalize("NFKD", s)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"['\u2019\u2018`]", "", text)  # dog's -> dogs, don't -> dont
    tokens = _merge_number_words(_TOKEN.findall(text))
    tokens = [_canonical_number(t) if _is_number(t) else _singular(t) for t in tokens]
    if len(tokens) > 1 and tokens[0] in _ARTICLES:
        tokens = tokens[1:]
    return " ".join(tokens)


# ---------------------------------------------------------------------------------------
# Unwrapping a raw response
# ---------------------------------------------------------------------------------------

_SPECIAL_TOKENS = re.compile(
    r"<\|[^<>|]{1,40}\|>"  # <|im_end|>, <|endoftext|>, <|eot_id|>
    r"|<\uff5c[^<>\uff5c]{1,40}\uff5c>"  # full-width bars (DeepSeek style)
    r"|</?(?:s|eos|bos|pad|unk|image|end_of_turn|start_of_turn|end_of_utterance)>"
    r"|\[(?:PAD|EOS|BOS|SEP|CLS|UNK)\]",
    re.IGNORECASE,
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _unwrap(response: str) -> str:
    """The answer part of a response: special tokens, reasoning and tags removed."""
    text = _SPECIAL_TOKENS.sub(" ", response)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        text = tags[-1]
    else:
        text = _THINK_BLOCK.sub(" ", text)
        lower = text.lower()
        if "<think>" in lower:  # reasoning cut off before any answer
            text = text[: lower.index("<think>")]
            lower = text.lower()
        if "<answer>" in lower:  # answer cut off before its closing tag
            text = text[lower.rindex("<answer>") + len("<answer>") :]
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    return text.strip()


# ---------------------------------------------------------------------------------------
# Matching names (options, classes, yes / no) inside normalised text
# ---------------------------------------------------------------------------------------


def _synonyms(task: TaskConfig) -> dict[str, str]:
    return {normalize_text(a): normalize_text(c) for a, c in task.synonym_pairs()}


def _named(text: str, names: dict[str, str]) -> str | None:
    """The one canonical answer that normalised `text` names, or None (none or several).

    `names` maps normalised phrases (names and their aliases) to canonical answers. A phrase
    inside a longer named phrase ("cat" in "black cat") does not count on its own.
    """
    if text in names:
        return names[text]
    tokens = text.split()
    spans: list[tuple[int, int, str]] = []
    for phrase, canonical in names.items():
        words = phrase.split()
        k = len(words)
        if k == 0:
            continue
        spans += [
            (i, i + k, canonical) for i in range(len(tokens) - k + 1) if tokens[i : i + k] == words
        ]
    kept = {
        c
        for s, e, c in spans
        if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2, _ in spans)
    }
    return kept.pop() if len(kept) == 1 else None


# ---------------------------------------------------------------------------------------
# Option letters
# ---------------------------------------------------------------------------------------

# A letter stands alone: not part of "it's", "I'm", "T-shirt", "e.g." or "U.S.".
_NOT_LETTER_BEFORE = r"(?<![\w-])(?<!\w['\u2019])(?<!\w\.)"
_NOT_LETTER_AFTER = r"(?![\w]|['\u2019]\w|-\w|\.\w)"
_LETTER = re.compile(_NOT_LETTER_BEFORE + r"([A-Za-z])" + _NOT_LETTER_AFTER)
_ONLY_LETTER = re.compile(r"[\s*_`\"'(\[{]*([A-Za-z])[\s*_`\"')\]}.:,;!?]*")
_LEADING_LETTER = re.compile(r"[\s*_`\"'(\[]*([A-Za-z])(?:[.:]\s|[)\]]\s*)")
_EXPLICIT = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?"
    r"[\s:=\-]+(?:(?:option|letter)\s+)?[*_`\"'(\[]*([A-Za-z])" + _NOT_LETTER_AFTER,
    re.IGNORECASE,
)
# Verbs that can follow a letter but never the article "a" or the pronoun "I".
_VERB_AFTER = re.compile(
    r"[ \t]+(?:is|was|seems|looks|appears|matches|fits|corresponds|describes|shows)\b",
    re.IGNORECASE,
)
_WORD_AFTER = re.compile(r"[ \t]+\w")
_NEGATED = re.compile(r"(?:\bnot|n['\u2019]t)\s*[*_`\"'(\[]*$", re.IGNORECASE)


def _names_letter(text: str, start: int, end: int) -> bool:
    """Is the single letter text[start:end] an option letter rather than a word?"""
    if text[start].lower() not in "ai":
        return True
    rest = text[end:]
    return bool(_VERB_AFTER.match(rest)) or not _WORD_AFTER.match(rest)


def _letter_choice(text: str, names: dict[str, str]) -> str | None:
    """The option letter a response names (upper case), or None.

    An option content stated as the whole response ("seven", "Vitamin C") returns None
    before letters inside it are looked for.
    """
    m = _ONLY_LETTER.fullmatch(text) or _LEADING_LETTER.match(text)
    if m:
        return m.group(1).upper()
    if normalize_text(text) in names:
        return None
    explicit = [m for m in _EXPLICIT.finditer(text) if _names_letter(text, *m.span(1))]
    if explicit:
        return explicit[-1].group(1).upper()
    for m in _LETTER.finditer(text):
        if _names_letter(text, *m.span(1)) and not _NEGATED.search(text[: m.start(1)]):
            return m.group(1).upper()
    return None


def _multiple_choice(text: str, options: Sequence[str], synonyms: dict[str, str]) -> str:
    canon = [normalize_text(o) or o.strip().lower() for o in options]
    names = {c: c for c in canon if c}
    names.update({a: c for a, c in synonyms.items() if c in names})
    letter = _letter_choice(text, names)
    if letter is not None:
        index = ord(letter) - ord("A")
        return canon[index] if index < len(canon) and canon[index] else INVALID
    return _named(normalize_text(text), names) or INVALID


# ---------------------------------------------------------------------------------------
# Yes / no, free text
# ---------------------------------------------------------------------------------------

_YES_FIRST = {"yes", "yeah", "yep", "yup", "y", "true", "correct", "affirmative"}
_NO_FIRST = {"no", "nope", "nah", "n", "false", "incorrect", "negative"}


def _yes_no(norm: str, synonyms: dict[str, str]) -> str:
    norm = synonyms.get(norm, norm)
    tokens = norm.split()
    if not tokens:
        return INVALID
    if tokens[0] in _YES_FIRST:
        return "yes"
    if tokens[0] in _NO_FIRST:
        return "no"
    return _named(norm, {"yes": "yes", "no": "no"}) or INVALID


_LEAD_IN = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+|correct\s+)?answer(?:\s+is)?\s*[:\-]?"
    r"|it\s+is|it['\u2019]s|this\s+is|that\s+is|there\s+(?:is|are)"
    r"|i\s+(?:see|count|think|believe))(?=[\s:,]|$)[\s:,]*",
    re.IGNORECASE,
)


def _free_text(text: str, synonyms: dict[str, str]) -> str:
    for _ in range(3):  # "Answer: I think it is 7"
        text = _LEAD_IN.sub("", text, count=1)
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    norm = normalize_text(line)
    if norm in synonyms:
        return synonyms[norm]
    tokens = norm.split()
    numbers = [t for t in tokens if _is_number(t)]
    if len(numbers) == 1 and len(tokens) <= 3:
        return numbers[0]
    free = " ".join(tokens[:MAX_FREE_WORDS])
    return synonyms.get(free, free) or INVALID


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def extract_answer(response: str, task: TaskConfig, options: Sequence[str] = ()) -> str:
    """The canonical answer in `response`, or INVALID.

    `options` are the option contents in the order shown (`Prompt.options`); when empty,
    the task's own options are used (multiple choice, classes).

    >>> from ttrv.config import TaskConfig
    >>> mc = TaskConfig(kind="multiple_choice", question="Which digit?", options="3,7,1,9")
    >>> extract_answer("B", mc), extract_answer("The answer is (d).", mc)
    ('7', '9')
    >>> extract_answer("B", mc, options=("7", "3", "9", "1"))
    '3'
    >>> extract_answer("E", mc), extract_answer("<|im_end|>", mc)
    ('<invalid>', '<invalid>')
    >>> cls = TaskConfig(kind="classes", question="What animal?", options="cat,dog")
    >>> extract_answer("It is a cat.", cls), extract_answer("Cats and dogs", cls)
    ('cat', '<invalid>')
    """
    text = _unwrap(response)
    if not text:
        return INVALID
    synonyms = _synonyms(task)
    if task.kind == "multiple_choice":
        shown = list(options) or task.option_list()
        if not shown:
            raise ValueError("extract_answer: a multiple-choice answer needs the shown options.")
        return _multiple_choice(text, shown, synonyms)
    if task.kind == "classes":
        classes = [normalize_text(c) for c in (list(options) or task.option_list())]
        names = {c: c for c in classes if c}
        names.update({a: c for a, c in synonyms.items() if c in names})
        return _named(normalize_text(text), names) or INVALID
    if task.kind == "yes_no":
        return _yes_no(normalize_text(text), synonyms)
    return _free_text(text, synonyms)


def canonical_label(label: str, task: TaskConfig) -> str:
    """A gold label in the same canonical form as `extract_answer`'s answers.

    Multiple-choice and class labels are option contents, never letters.

    >>> from ttrv.config import TaskConfig
    >>> canonical_label("Seven", TaskConfig(kind="multiple_choice", options="3,7"))
    '7'
    """
    if task.kind in ("multiple_choice", "classes"):
        norm = normalize_text(label)
        return _synonyms(task).get(norm, norm) or INVALID
    return extract_answer(label, task)


def answer_distribution(answers: Iterable[str]) -> dict[str, float]:
    """Empirical distribution over answers (INVALID is a key like any other), most common first.

    >>> answer_distribution(["7", "7", "1", INVALID])
    {'7': 0.5, '1': 0.25, '<invalid>': 0.25}
    """
    counts = Counter(answers)
    n = sum(counts.values())
    return {a: c / n for a, c in counts.most_common()}
