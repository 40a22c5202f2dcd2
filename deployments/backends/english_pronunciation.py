"""Pronunciations for the English alignment units a pronouncing dictionary lacks.

PocketSphinx aligns only words its dictionary knows. `UnitPronouncer.pronounce(unit)` says which
dictionary word to align for a unit and, when it had to invent one, the pronunciations to add:

- the unit as written (lowercased) or with its accents folded ("naïve" -> "naive"): used as is;
- numbers are spelled out, each common reading an alternate pronunciation so that the aligner picks
  the one that was spoken: "1990" -> "one thousand nine hundred ninety" | "... and ninety" |
  "nineteen ninety"; "3rd" -> "third"; "90s" -> "nineties"; leading zeros and long digit strings
  are read digit by digit;
- other words are split into dictionary words if they can be ("livestream" -> live + stream), and
  go through a grapheme-to-phoneme network (`NeuralG2P`) if not;
- units mixing letters and digits ("mp3", "covid19") are pronounced run by run.

Invented words are named with a leading underscore, which no unit contains (units are letters,
digits and apostrophes), so they never shadow a dictionary word and a dictionary lookup of a unit
never finds one. A unit with no Latin letter or digit left after folding (e.g. Cyrillic) cannot be
pronounced: `pronounce` returns None and the caller fails that job.
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# lookup(word) -> the dictionary's first pronunciation ("F AO R T IY") or None
DictionaryLookup = Callable[[str], str | None]

INVENTED_WORD_PREFIX = "_"

# Letters NFKD does not decompose, spelled as English readers would say them.
_LETTER_FOLDS = {"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "th", "þ": "th", "ı": "i"}
_NUMBER_UNIT = re.compile(r"(\d+)(st|nd|rd|th|s)?")
_RUNS = re.compile(r"\d+|[a-z']*[a-z][a-z']*")  # digit runs and letter runs; lone apostrophes dropped

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ("", "thousand", "million", "billion", "trillion")
_MAX_CARDINAL_DIGITS = 3 * len(_SCALES)  # beyond this only a digit-by-digit reading makes sense
_MIN_DIGITS_READ_ONE_BY_ONE = 5  # "12345" is as often "one two three four five"
_MIN_COMPOUND_PART, _MAX_COMPOUND_PART = 3, 20  # letters per dictionary word in a compound split
_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
             "nine": "ninth", "twelve": "twelfth"}  # fmt: skip


@dataclass(frozen=True)
class Pronunciation:
    word: str  # the dictionary word to align for the unit
    new_phones: tuple[str, ...] = ()  # pronunciations to add under `word` first; () when known


def fold_to_ascii(unit: str) -> str:
    """Lowercase, strip accents, spell the few unsplittable letters; keep only a-z, 0-9 and '."""
    decomposed = unicodedata.normalize("NFKD", unit.lower())
    spelled = "".join(_LETTER_FOLDS.get(char, char) for char in decomposed if not unicodedata.combining(char))
    return re.sub(r"[^a-z0-9']", "", spelled)


# --- numbers -------------------------------------------------------------------------------------


def _below_hundred(number: int) -> list[str]:
    if number < 20:
        return [_ONES[number]]
    tens, ones = divmod(number, 10)
    return [_TENS[tens]] + ([_ONES[ones]] if ones else [])


def _below_thousand(number: int, british: bool) -> list[str]:
    hundreds, rest = divmod(number, 100)
    words = [_ONES[hundreds], "hundred"] if hundreds else []
    if rest:
        words += (["and"] if hundreds and british else []) + _below_hundred(rest)
    return words


def cardinal_words(number: int, british: bool = False) -> list[str]:
    """1905 -> one thousand nine hundred five (british: ... nine hundred and five)."""
    if number == 0:
        return ["zero"]
    groups: list[int] = []  # three-digit groups, least significant first
    while number:
        number, group = divmod(number, 1000)
        groups.append(group)
    words: list[str] = []
    for scale in reversed(range(len(groups))):
        if groups[scale]:
            words += _below_thousand(groups[scale], british) + ([_SCALES[scale]] if scale else [])
    if british and len(groups) > 1 and 0 < groups[0] < 100:
        words.insert(len(words) - len(_below_hundred(groups[0])), "and")  # "one thousand and five"
    return words


def _year_words(number: int) -> list[str] | None:
    """1990 -> nineteen ninety, 1905 -> nineteen oh five, 1900 -> nineteen hundred; None if unusual."""
    if not 1000 <= number <= 9999:
        return None
    century, rest = divmod(number, 100)
    if century % 10 == 0 and rest < 10:
        return None  # 2005 is "two thousand five": the cardinal reading already covers it
    if rest == 0:
        return _below_hundred(century) + ["hundred"]
    return _below_hundred(century) + (["oh", _ONES[rest]] if rest < 10 else _below_hundred(rest))


def _with_suffix(words: list[str], suffix: str | None) -> list[str]:
    """Apply an ordinal (st/nd/rd/th) or plural (s) suffix to the last word of a reading."""
    if not suffix:
        return words
    last = words[-1]
    if suffix == "s":
        changed = last[:-1] + "ies" if last.endswith("y") else last + ("es" if last.endswith("x") else "s")
    else:
        changed = _ORDINALS.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return words[:-1] + [changed]


def number_readings(digits: str, suffix: str | None = None) -> list[list[str]]:
    """Every common way to read a digit string (with an optional st/nd/rd/th/s suffix), most usual first."""
    readings: list[list[str]] = []
    as_written = len(digits) == 1 or not digits.startswith("0")
    if as_written and len(digits) <= _MAX_CARDINAL_DIGITS:
        value = int(digits)
        readings += [cardinal_words(value), cardinal_words(value, british=True)]
        year = _year_words(value) if len(digits) == 4 else None
        if year:
            readings.append(year)
    if not readings or len(digits) >= _MIN_DIGITS_READ_ONE_BY_ONE:
        readings.append([_ONES[int(digit)] for digit in digits])
    unique = list(dict.fromkeys(tuple(_with_suffix(reading, suffix)) for reading in readings))
    return [list(reading) for reading in unique]


# --- grapheme to phoneme -------------------------------------------------------------------------


class NeuralG2P:
    """g2p_en's grapheme-to-phoneme network (a GRU encoder-decoder trained on CMUdict), run in numpy.

    Only its weight file is read, found without importing the package: importing g2p_en makes nltk
    try to download corpora (these machines are offline), and its sentence front end (tokeniser,
    tagger, homographs) is not needed for single words. Greedy decoding as in g2p_en 2.1.0
    (Apache-2.0). Phones come back without stress marks, as the PocketSphinx model wants them.
    """

    _GRAPHEMES = ("<pad>", "<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz")
    _PHONEMES = (
        "<pad> <unk> <s> </s> AA0 AA1 AA2 AE0 AE1 AE2 AH0 AH1 AH2 AO0 AO1 AO2 AW0 AW1 AW2 AY0 AY1 AY2 "
        "B CH D DH EH0 EH1 EH2 ER0 ER1 ER2 EY0 EY1 EY2 F G HH IH0 IH1 IH2 IY0 IY1 IY2 JH K L M N NG "
        "OW0 OW1 OW2 OY0 OY1 OY2 P R S SH T TH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH"
    ).split()
    _START, _FIRST_PHONE = 2, 4  # indices of <s> and of the first real phone in _PHONEMES
    _EXTRA_PHONES = 10  # decoding cap beyond one phone per letter: the model may fail to stop

    def __init__(self) -> None:
        spec = importlib.util.find_spec("g2p_en")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("g2p_en is not installed: it ships the G2P weights")
        weights = np.load(Path(spec.submodule_search_locations[0]) / "checkpoint20.npz")
        self._weights = {name: weights[name] for name in weights.files}
        self._grapheme_index = {grapheme: index for index, grapheme in enumerate(self._GRAPHEMES)}

    def phones(self, letters: str) -> list[str]:
        """Phones for a word of letters a-z ("kubernetes" -> K UW B ER N EH T IY Z)."""
        w = self._weights
        hidden = np.zeros((1, w["enc_w_hh"].shape[1]), np.float32)
        indices = [self._grapheme_index.get(char, 1) for char in letters] + [self._grapheme_index["</s>"]]
        for index in indices:
            hidden = self._gru_cell(w["enc_emb"][index][None], hidden, "enc")
        phones: list[str] = []
        previous = self._START
        for _ in range(len(letters) + self._EXTRA_PHONES):
            hidden = self._gru_cell(w["dec_emb"][previous][None], hidden, "dec")
            previous = int((hidden @ w["fc_w"].T + w["fc_b"]).argmax())
            if previous < self._FIRST_PHONE:
                break  # </s> (or another marker, which would not be a phone either)
            phones.append(self._PHONEMES[previous].rstrip("012"))
        return phones

    def _gru_cell(self, inputs: np.ndarray, hidden: np.ndarray, part: str) -> np.ndarray:
        """One PyTorch-convention GRU step (gates ordered reset, update, new)."""
        w = self._weights
        from_input = inputs @ w[f"{part}_w_ih"].T + w[f"{part}_b_ih"]
        from_hidden = hidden @ w[f"{part}_w_hh"].T + w[f"{part}_b_hh"]
        size = hidden.shape[1]
        reset, update = np.split(_sigmoid(from_input[:, : 2 * size] + from_hidden[:, : 2 * size]), 2, axis=1)
        new = np.tanh(from_input[:, 2 * size :] + reset * from_hidden[:, 2 * size :])
        return (1 - update) * new + update * hidden


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-values))


# --- units ---------------------------------------------------------------------------------------


class UnitPronouncer:
    """Maps alignment units to dictionary words, inventing pronunciations for the unknown ones."""

    def __init__(self, lookup: DictionaryLookup, g2p: NeuralG2P) -> None:
        self._lookup = lookup
        self._g2p = g2p

    def pronounce(self, unit: str) -> Pronunciation | None:
        lowered = unit.lower()
        if self._lookup(lowered):
            return Pronunciation(lowered)
        folded = fold_to_ascii(unit).strip("'")  # "'90s" reads as "90s"
        if folded and self._lookup(folded):
            return Pronunciation(folded)
        number = _NUMBER_UNIT.fullmatch(folded)
        if number:
            readings = number_readings(number.group(1), number.group(2))
            alternates = [[phone for word in reading for phone in self._word_phones(word)] for reading in readings]
        else:
            alternates = [[phone for run in _RUNS.findall(folded) for phone in self._run_phones(run)]]
        spoken = tuple(dict.fromkeys(" ".join(phones) for phones in alternates if phones))
        return Pronunciation(INVENTED_WORD_PREFIX + folded, spoken) if spoken else None

    def _run_phones(self, run: str) -> list[str]:
        if run.isdigit():
            return [phone for word in number_readings(run)[0] for phone in self._word_phones(word)]
        return self._word_phones(run)

    def _word_phones(self, word: str) -> list[str]:
        letters = word.replace("'", "")
        known = self._lookup(word) or self._lookup(letters)
        if known:
            return known.split()
        return self._compound_phones(letters) or self._g2p.phones(letters)

    def _compound_phones(self, letters: str) -> list[str] | None:
        """Split "livestream" into live + stream: the split into the fewest dictionary words, if any.

        The G2P network mangles long compounds; dictionary parts are exact. Parts are at least
        three letters long so that stray "a"/"i" splits do not turn names into word salad.
        """
        # fewest_parts[end]: pronunciations of the best split of letters[:end], None if there is none
        fewest_parts: list[list[str] | None] = [[]] + [None] * len(letters)
        for end in range(_MIN_COMPOUND_PART, len(letters) + 1):
            for start in range(max(0, end - _MAX_COMPOUND_PART), end - _MIN_COMPOUND_PART + 1):
                before = fewest_parts[start]
                if before is None:
                    continue
                current = fewest_parts[end]
                if current is not None and len(current) <= len(before) + 1:
                    continue
                part = self._lookup(letters[start:end])
                if part:
                    fewest_parts[end] = before + [part]
        parts = fewest_parts[-1]
        return " ".join(parts).split() if parts and len(parts) > 1 else None
