"""Decoded audio crosses one hop (issue 15): the scanner shares a short clip's PCM through Ray's
object store, the ingress passes only the reference, and the aligner reads it (real graph)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from ray import serve

from deployments.backends.base import AlignmentJob, SharedPcm, UnitTiming
from serve_app.media import DecodedAudio
from serve_app.media.decode import float_samples, read_pcm, read_samples
from serve_app.media.spool import Spool
from tests.conftest import EVAL_DIR
from tests.support.audio import encode, tone


@pytest.fixture
def scan(serve_url, spool_dir):
    """Scan an upload with the "aligner" application's Scanner; the PCM files are removed afterwards."""
    spool, decoded = Spool(spool_dir), []

    def scan(upload: bytes, share_up_to_s: float) -> DecodedAudio:
        with spool.writer("upload") as writer:
            writer.write(upload)
            spooled = writer.commit()
        verdict = serve.get_deployment_handle("Scanner", app_name="aligner").inspect.remote(spooled, 1800.0, share_up_to_s).result()
        spool.remove(spooled)
        assert isinstance(verdict, DecodedAudio), verdict
        decoded.append(verdict)
        return verdict

    yield scan
    for audio in decoded:
        spool.remove(audio.pcm_path)


def test_audio_up_to_the_limit_is_shared_once_and_longer_audio_is_not(scan):
    audio = encode(tone(2.0, 44_100, channels=2), 44_100, "wav")
    shared = scan(audio, share_up_to_s=2.0)
    assert isinstance(shared.shared, SharedPcm) and shared.shared.sample_count == shared.sample_count == 32_000
    assert np.array_equal(ray.get(shared.shared.ref[0]), read_pcm(shared.pcm_path))  # the same samples as the spool file
    assert scan(audio, share_up_to_s=1.9).shared is None  # a window of a longer file is read from the spool
    assert scan(audio, share_up_to_s=0.0).shared is None  # jobs: their audio waits in the job spool


def test_the_aligner_aligns_a_shared_clip_as_it_aligns_its_samples(scan, eval_utterances):
    utterance = eval_utterances[0]
    decoded = scan((EVAL_DIR / utterance["audio"]).read_bytes(), share_up_to_s=60.0)
    assert decoded.shared is not None
    units = tuple(utterance["transcript"].split())
    aligner = serve.get_deployment_handle("Aligner", app_name="aligner")
    by_reference = aligner.align.remote(AlignmentJob(decoded.shared, units, "English")).result()
    by_value = aligner.align.remote(AlignmentJob(read_samples(decoded.pcm_path, 0, decoded.sample_count), units, "English")).result()
    assert isinstance(by_reference, list) and all(isinstance(timing, UnitTiming) for timing in by_reference)
    assert by_reference == by_value
    assert float_samples(read_pcm(decoded.pcm_path)).flags.writeable  # backends get arrays of their own

