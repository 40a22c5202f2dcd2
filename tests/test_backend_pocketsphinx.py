"""The PocketSphinx backend on real speech: the hand-labelled dev set in ../shared/eval/emuR_ae.

Also the pieces it relies on: number readings, accent folding and the invented-word bound, and the
boundary metric that bench/accuracy.py reports.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench.degraded import degraded_set
from bench.eval_set import EvalUtterance, ReferenceWord, load_eval_set, score_alignments
from deployments.backends import pocketsphinx as sphinx_module
from deployments.backends.base import SAMPLE_RATE, AlignmentFailed, AlignmentJob, UnitTiming
from deployments.backends.english_pronunciation import (
    NeuralG2P,
    UnitPronouncer,
    cardinal_words,
    fold_to_ascii,
    number_readings,
)
from deployments.backends.pocketsphinx import PocketSphinxBackend
from deployments.backends.speech_edges import silent_frames

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend() -> PocketSphinxBackend:
    return PocketSphinxBackend()


@pytest.fixture(scope="module")
def utterances() -> list[EvalUtterance]:
    return load_eval_set()


def assert_well_formed(job: AlignmentJob, answer: list[UnitTiming] | AlignmentFailed) -> None:
    assert not isinstance(answer, AlignmentFailed), answer.reason
    duration = job.audio.size / SAMPLE_RATE
    assert [timing.text for timing in answer] == list(job.units)
    for timing in answer:
        assert 0.0 <= timing.start <= timing.end <= duration
    starts = [timing.start for timing in answer]
    assert starts == sorted(starts)


def test_every_dev_utterance_gets_one_timing_per_unit_inside_the_audio(backend, utterances):
    jobs = [utterance.job() for utterance in utterances]
    for job, answer in zip(jobs, backend.align_batch(jobs)):
        assert_well_formed(job, answer)


def test_dev_set_accuracy_is_close_to_the_hand_labels(backend, utterances):
    answers = backend.align_batch([utterance.job() for utterance in utterances])
    report = score_alignments([(utterance.words, answer) for utterance, answer in zip(utterances, answers)])
    assert report.missing_words == 0
    assert report.mean_ms < 40  # measured 18 ms; a wrong frame rate or sample scaling breaks this
    assert report.percent_within_ms[100] >= 90


def test_every_word_has_a_confidence_and_no_flag_when_all_were_aligned(backend, utterances):
    for answer in backend.align_batch([utterance.job() for utterance in utterances]):
        assert all(0.0 <= timing.confidence <= 1.0 for timing in answer)
        assert all(timing.flags == () for timing in answer)


def test_a_draft_gets_one_pass_and_no_confidence(backend, utterances):
    """A long file's locating window: realigned later, so the second pass would be wasted."""
    job = utterances[0].job()
    (draft,) = backend.align_batch([dataclasses.replace(job, draft=True)])
    (final,) = backend.align_batch([job])
    assert_well_formed(job, draft)
    assert all(timing.confidence == 0.0 and timing.flags == () for timing in draft)
    assert any(timing.confidence > 0.5 for timing in final)
    assert score_alignments([(utterances[0].words, draft)]).mean_ms < 40
    # The plain pass on its own: times on the 10 ms frame grid (the final mean of two is on a 5 ms one).
    assert all(round(timing.start * 100, 6).is_integer() for timing in draft if timing.start > 0)


@pytest.mark.parametrize("variant", ["clean", "padded-3s"])
def test_no_first_word_starts_inside_the_leading_silence(backend, utterances, variant):
    """It used to absorb 10-40 ms of it; a frame or two early is the most allowed now."""
    for utterance in degraded_set(variant, utterances):
        (answer,) = backend.align_batch([utterance.job()])
        assert answer[0].start >= utterance.words[0].start - 0.02, utterance.id


def test_no_word_edge_lies_inside_silence(backend, utterances):
    """What speech_edges calls silence (a quiet stretch of 80 ms or more) holds no word's first or last frame."""
    for utterance in degraded_set("padded-3s", utterances):
        silent = silent_frames(utterance.audio)
        (answer,) = backend.align_batch([utterance.job()])
        for timing in answer:
            first, last = round(timing.start * 100), round(timing.end * 100) - 1
            assert not silent[first] and not silent[last], (utterance.id, timing.text)


def test_low_confidence_words_are_the_badly_aligned_ones(backend, utterances):
    """The calibration bench/accuracy.py measures on every variant, on a few of them here."""
    low, high = [], []
    for variant in ("clean", "white-10db", "babble-20db", "telephone-8k", "mp3-8k"):
        for utterance in degraded_set(variant, utterances):
            (answer,) = backend.align_batch([utterance.job()])
            for expected, got in zip(utterance.words, answer):
                error = (abs(got.start - expected.start) + abs(got.end - expected.end)) / 2
                (low if got.confidence < 0.5 else high).append(error)
    assert len(low) >= 10 and len(high) >= 10 * len(low) / 2
    assert np.mean(low) > 1.5 * np.mean(high)


def test_words_the_decoder_puts_back_to_back_touch_exactly(backend, utterances):
    """seg()'s end frame is inclusive: read speech has mostly no pause between words, so most
    neighbours must share a boundary, and none may overlap (a one-frame slip shows as 10 ms gaps)."""
    for answer in backend.align_batch([utterance.job() for utterance in utterances]):
        pairs = list(zip(answer, answer[1:]))
        assert all(first.end <= second.start + 1e-9 for first, second in pairs)
        touching = sum(second.start - first.end == pytest.approx(0.0, abs=1e-9) for first, second in pairs)
        assert touching >= len(pairs) / 2


def test_a_batch_gives_the_same_timings_as_single_calls(backend, utterances):
    jobs = [utterance.job() for utterance in utterances[:3]]
    singles = [backend.align_batch([job])[0] for job in jobs]
    assert backend.align_batch(jobs) == singles


def test_long_audio_aligns(backend, utterances):
    """About a minute of speech in one job (the dev clips back to back, three times)."""
    clips = utterances * 3
    audio = np.concatenate([clip.audio for clip in clips])
    reference: list[ReferenceWord] = []
    offset = 0.0
    for clip in clips:
        reference += [ReferenceWord(word.word, word.start + offset, word.end + offset) for word in clip.words]
        offset += clip.duration
    job = AlignmentJob(audio, tuple(word.word for word in reference), "English")
    assert job.audio.size / SAMPLE_RATE > 60

    (answer,) = backend.align_batch([job])

    assert_well_formed(job, answer)
    assert score_alignments([(reference, answer)]).mean_ms < 40


def test_unknown_words_and_numbers_align_and_leave_the_known_words_accurate(backend, utterances):
    """Made-up words, numbers and accents appended to a labelled utterance.

    They are not what is spoken after it (two other dev clips are), so only the shape of their
    timings is checked; the labelled words before them must stay accurate. (Unspoken words over
    near-silence leave the search no path at all: that is the no-alignment-found case.)
    """
    labelled, *others = utterances[:3]
    extra = ("blorptastic", "42", "1990s", "21st", "naïve", "Straße", "covid19", "livestream", "xqzzy's")
    audio = np.concatenate([labelled.audio] + [other.audio for other in others])
    job = AlignmentJob(audio, labelled.job().units + extra, "English")

    (answer,) = backend.align_batch([job])

    assert_well_formed(job, answer)
    assert score_alignments([(labelled.words, answer[: len(labelled.words)])]).mean_ms < 40


def test_unknown_words_are_pronounced_without_importing_g2p_en_or_nltk():
    """Importing g2p_en makes nltk try to download corpora; the backend must only read its weights."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from deployments.backends.base import AlignmentJob
        from deployments.backends.pocketsphinx import PocketSphinxBackend
        audio = np.zeros(16000, np.float32)
        (answer,) = PocketSphinxBackend().align_batch([AlignmentJob(audio, ("blorptastic",), "English")])
        assert len(answer) == 1, answer
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("nltk", "g2p_en")))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == "[]"


def test_other_languages_are_refused_and_do_not_affect_the_rest_of_the_batch(backend, utterances):
    english = utterances[0].job()
    german = AlignmentJob(english.audio, english.units, "German")
    refused, aligned = backend.align_batch([german, english])
    assert isinstance(refused, AlignmentFailed) and refused.reason == "unsupported-language"
    assert_well_formed(english, aligned)


def test_a_unit_without_latin_letters_or_digits_fails_its_job_without_echoing_it(backend, utterances):
    job = AlignmentJob(utterances[0].audio, ("hello", "Привет"), "English")
    (answer,) = backend.align_batch([job])
    assert isinstance(answer, AlignmentFailed) and answer.reason == "unpronounceable-unit"
    assert "Привет" not in answer.detail and "hello" not in answer.detail


def test_a_transcript_the_wide_search_cannot_place_is_retried_with_the_widest_beams(utterances):
    """Another clip's words over this clip's audio: the wide beams find no path, the widest do."""
    fresh = PocketSphinxBackend()
    job = AlignmentJob(utterances[1].audio, utterances[0].job().units, "English")
    (answer,) = fresh.align_batch([job])
    assert_well_formed(job, answer)
    assert fresh._widest is not None  # the retry ran


def test_a_transcript_that_cannot_fit_the_audio_fails_after_the_retry(backend, utterances):
    tenth_of_a_second = utterances[0].audio[: SAMPLE_RATE // 10]
    crowded = AlignmentJob(tenth_of_a_second, utterances[0].job().units * 3, "English")
    empty = AlignmentJob(np.zeros(0, np.float32), ("hello",), "English")
    for answer in backend.align_batch([crowded, empty]):
        assert isinstance(answer, AlignmentFailed) and answer.reason == "no-alignment-found"


def test_audio_longer_than_the_backend_limit_is_refused(utterances):
    short_limit = PocketSphinxBackend(max_audio_seconds=2.0)
    (answer,) = short_limit.align_batch([utterances[0].job()])  # ~2.9 s
    assert isinstance(answer, AlignmentFailed) and answer.reason == "audio-too-long"


def test_invented_words_are_bounded_by_rebuilding_the_decoder(monkeypatch, utterances):
    monkeypatch.setattr(sphinx_module, "MAX_INVENTED_PHONES", 12)
    bounded = PocketSphinxBackend()
    for made_up in ("blorp", "snarfle", "quuxly"):  # 5, 7 and 6 phones
        job = AlignmentJob(utterances[0].audio, utterances[0].job().units + (made_up,), "English")
        assert_well_formed(job, bounded.align_batch([job])[0])
    # The third word went over the bound: the decoder was rebuilt and forgot the first two.
    library_beams = bounded._library  # the first decoder every clip's passes use
    assert library_beams.lookup_word("_quuxly") is not None
    assert library_beams.lookup_word("_blorp") is None


# --- pronunciation helpers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "british", "words"),
    [
        (0, False, "zero"),
        (42, False, "forty two"),
        (105, True, "one hundred and five"),
        (1005, True, "one thousand and five"),
        (2_000_017, False, "two million seventeen"),
    ],
)
def test_cardinal_words(number, british, words):
    assert " ".join(cardinal_words(number, british)) == words


@pytest.mark.parametrize(
    ("digits", "suffix", "expected"),
    [
        ("1990", None, "nineteen ninety"),
        ("1905", None, "nineteen oh five"),
        ("21", "st", "twenty first"),
        ("12", "th", "twelfth"),
        ("90", "s", "nineties"),
        ("007", None, "zero zero seven"),
        ("9" * 5000, None, " ".join(["nine"] * 5000)),  # too long for int(): digit by digit only
    ],
)
def test_number_readings_include_the_spoken_form(digits, suffix, expected):
    assert expected in [" ".join(reading) for reading in number_readings(digits, suffix)]


def test_fold_to_ascii():
    assert fold_to_ascii("Naïve") == "naive"
    assert fold_to_ascii("Straße") == "strasse"
    assert fold_to_ascii("Привет") == ""


def test_numbers_are_one_dictionary_word_with_every_reading_as_an_alternate(backend):
    pronouncer = UnitPronouncer(backend._wide.lookup_word, NeuralG2P())
    pronunciation = pronouncer.pronounce("1990")
    assert pronunciation.word == "_1990"
    assert "N AY N T IY N N AY N T IY" in pronunciation.new_phones  # nineteen ninety
    assert pronouncer.pronounce("Naïve").word == "naive"  # folded onto the dictionary's entry
    assert pronouncer.pronounce("livestream").new_phones == ("L AY V S T R IY M",)  # live + stream


def test_score_alignments_pairs_words_by_position_and_counts_missing_ones():
    reference = [ReferenceWord("a", 0.10, 0.20), ReferenceWord("b", 0.20, 0.40)]
    one_word_answer = [UnitTiming("a", 0.12, 0.25, 1.0)]
    report = score_alignments([(reference, one_word_answer), (reference, AlignmentFailed("x", "y"))])
    assert report.boundaries == 2
    assert report.missing_words == 3
    assert report.mean_ms == pytest.approx(35.0)
    assert report.percent_within_ms == {20: 50.0, 50: 100.0, 100: 100.0}


def test_an_answer_depends_on_its_own_audio_only_never_on_what_was_aligned_before(utterances):
    """The decoder's noise estimate and cepstral mean must not carry over between jobs: the same
    request answers the same, whatever the replica aligned before (a job equals its /v1/align answer)."""
    backend = PocketSphinxBackend()
    in_order = [backend.align_batch([utterance.job()])[0] for utterance in utterances]
    reversed_order = [backend.align_batch([utterance.job()])[0] for utterance in reversed(utterances)][::-1]
    fresh = [PocketSphinxBackend().align_batch([utterance.job()])[0] for utterance in utterances[-2:]]
    assert in_order == reversed_order
    assert in_order[-2:] == fresh
