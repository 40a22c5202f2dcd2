"""The full HTTP path through the real Serve graph: ingress -> scanner -> batched aligner."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import soundfile

from serve_app.settings import IngressOptions
from tests.conftest import EVAL_DIR, TEST_MAX_UPLOAD_BYTES
from tests.support.audio import encode, silence_flac, tone

PROBLEM_PREFIX = "urn:forced-aligner:problem:"


def eval_clip(utterance: dict) -> bytes:
    return (EVAL_DIR / utterance["audio"]).read_bytes()


def post_align(client, audio: bytes, text: str, prefix: str = "", **fields):
    files = {"audio": ("clip.wav", audio, "audio/wav")}
    data = {"text": text, **fields}
    return client.post(f"{prefix}/v1/align", files=files, data=data)


def assert_problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM_PREFIX + slug
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert "Traceback" not in response.text and "File \"" not in response.text
    return body


def assert_well_formed(words: list[dict], duration: float) -> None:
    for word in words:
        assert 0.0 <= word["start"] <= word["end"] <= duration
    for previous, current in zip(words, words[1:]):
        assert previous["start"] <= current["start"]
        assert previous["end"] <= current["start"]


# -- liveness, readiness, OpenAPI ----------------------------------------------------------------


def test_health(client):
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def wait_for_readiness(client, prefix: str, status: int, timeout_s: float = 30):
    """/v1/ready once it reads `status`: it answers from a report refreshed every 2 s in the background."""
    deadline = time.monotonic() + timeout_s
    while (response := client.get(f"{prefix}/v1/ready")).status_code != status and time.monotonic() < deadline:
        time.sleep(0.5)
    return response


@pytest.mark.parametrize(("prefix", "backend"), [("", "pocketsphinx"), ("/qwen3", "qwen3")])
def test_ready_is_open_and_the_dependency_report_names_the_loaded_backend(anonymous, admin_key, prefix, backend):
    response = wait_for_readiness(anonymous, prefix, 200)
    report = anonymous.get(f"{prefix}/v1/admin/dependencies", headers={"Authorization": f"Bearer {admin_key}"})
    assert response.status_code == 200, report.text
    assert response.json() == {"status": "ready", "jobs": "ready"}  # nothing more for a load balancer
    assert report.status_code == 200, report.text
    body = report.json()
    assert body["status"] == "ready"
    assert body["backend"] == backend
    assert {name: check["status"] for name, check in body["checks"].items()} == dict.fromkeys(("scanner", "clamd", "aligner", "redis", "spool", "jobs"), "ready")
    assert 0 <= body["age_s"] < 10


def test_openapi_is_versioned_and_documents_the_multipart_body(client):
    spec = client.get("/v1/openapi.json").json()
    operation = spec["paths"]["/v1/align"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["audio", "text"]
    assert {"400", "413", "415", "422", "503"} <= set(operation["responses"])


# -- alignment with the PocketSphinx backend -----------------------------------------------------


def test_align_json_returns_callers_words_with_accurate_times(client, eval_utterances):
    utterance = eval_utterances[0]
    words = utterance["transcript"].split()
    words[0] = words[0].capitalize() + ","  # punctuation and case must come back untouched
    words[-1] += "!"
    response = post_align(client, eval_clip(utterance), " ".join(words), language="en-AU")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backend"] == "pocketsphinx"
    assert body["language"] == "English"
    assert body["duration"] == pytest.approx(utterance["duration"], abs=0.01)
    assert body["id"] == response.headers["x-request-id"]
    assert [word["text"] for word in body["words"]] == words
    assert_well_formed(body["words"], body["duration"])
    errors = [
        abs(got[edge] - want[edge]) for got, want in zip(body["words"], utterance["words"]) for edge in ("start", "end")
    ]
    assert np.mean(errors) < 0.06  # the accuracy figure proper is measured by bench/accuracy.py
    assert all(0 <= word["confidence"] <= 1 and word["flags"] == [] for word in body["words"])


def test_a_word_with_no_time_is_flagged_interpolated_with_no_confidence(client, eval_utterances):
    utterance = eval_utterances[0]
    response = post_align(client, eval_clip(utterance), "— " + utterance["transcript"])
    assert response.status_code == 200, response.text
    dash, *spoken = response.json()["words"]
    assert (dash["confidence"], dash["flags"]) == (0.0, ["interpolated"])
    assert all(word["flags"] == [] for word in spoken)


def test_openapi_documents_confidence_and_flags(client):
    word = client.get("/v1/openapi.json").json()["components"]["schemas"]["WordOut"]
    assert set(word["required"]) >= {"text", "start", "end", "confidence", "flags"}
    assert word["properties"]["flags"]["items"]["enum"] == ["interpolated", "repaired"]
    assert "twice the boundary error" in word["properties"]["confidence"]["description"]


@pytest.mark.parametrize("container", ["flac", "mp3", "ogg-opus", "m4a", "webm"])
def test_common_containers_decode_and_align(client, eval_utterances, container):
    utterance = eval_utterances[1]
    samples, rate = soundfile.read(EVAL_DIR / utterance["audio"], dtype="float32")
    response = post_align(client, encode(samples[np.newaxis, :], rate, container), utterance["transcript"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["duration"] == pytest.approx(utterance["duration"], abs=0.1)
    assert len(body["words"]) == len(utterance["words"])


@pytest.mark.parametrize(
    ("output", "media_type", "marker"),
    [("srt", "application/x-subrip", "1\n00:00:0"), ("vtt", "text/vtt", "WEBVTT\n\n00:00:0"), ("textgrid", "text/plain", 'name = "words"')],
)
def test_output_formats(client, eval_utterances, output, media_type, marker):
    utterance = eval_utterances[2]
    response = post_align(client, eval_clip(utterance), utterance["transcript"], format=output)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(media_type)
    assert marker in response.text
    for word in utterance["transcript"].split():
        assert word in response.text


# -- the Qwen3 backend (tiny random-weight checkpoint through the real qwen_asr path) --------------


@pytest.mark.parametrize(
    ("text", "language", "expected_words"),
    [
        ("Hello, wonderful world!", "English", ["Hello,", "wonderful", "world!"]),
        ("你好，世界。", "zh", ["你", "好，", "世", "界。"]),
        ("Guten Tag, Welt", "deu", ["Guten", "Tag,", "Welt"]),
    ],
)
def test_qwen3_backend_serves_every_language(client, text, language, expected_words):
    audio = encode(tone(3.0, 16_000), 16_000, "wav")
    response = post_align(client, audio, text, prefix="/qwen3", language=language)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backend"] == "qwen3"
    assert "tiny-qwen3" in body["model"]
    assert [word["text"] for word in body["words"]] == expected_words
    assert_well_formed(body["words"], body["duration"])


def test_concurrent_requests_are_batched(client, ray_cluster):
    from ray import serve

    aligner = serve.get_deployment_handle("Aligner", app_name="qwen3")
    before = aligner.batch_sizes.remote().result()
    audio = encode(tone(2.0, 16_000), 16_000, "wav")
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: post_align(client, audio, "one two three", prefix="/qwen3"), range(8)))
    assert all(response.status_code == 200 for response in responses)
    after = aligner.batch_sizes.remote().result()
    new_batches = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * count for size, count in new_batches.items()) == 8
    assert max(size for size, count in new_batches.items() if count > 0) >= 2


# -- error paths: each answers its documented problem, and the service keeps serving ---------------


def test_missing_fields(client):
    response = client.post("/v1/align", files={"audio": ("a.wav", b"RIFF", "audio/wav")})
    assert "text" in assert_problem(response, 400, "invalid-request")["detail"]
    response = client.post("/v1/align", files={"text": (None, "hello")})
    assert "audio" in assert_problem(response, 400, "invalid-request")["detail"]


def test_body_must_be_multipart(client):
    response = client.post("/v1/align", json={"text": "hello"})
    assert_problem(response, 415, "multipart-required")


def test_unknown_and_repeated_fields_are_refused(client):
    response = client.post("/v1/align", files={"audio": ("a.wav", b"x", None), "text": (None, "hi"), "callback": (None, "x")})
    assert_problem(response, 400, "invalid-request")
    response = client.post("/v1/align", files=[("audio", ("a.wav", b"x", None)), ("audio", ("b.wav", b"y", None)), ("text", (None, "hi"))])
    assert "more than once" in assert_problem(response, 400, "invalid-request")["detail"]


def test_invalid_format_value(client, eval_utterances):
    response = post_align(client, eval_clip(eval_utterances[0]), "hello", format="pdf")
    assert_problem(response, 400, "invalid-request")


@pytest.mark.parametrize("language", ["Klingon", "xx", "en-"])
def test_unknown_language(client, eval_utterances, language):
    response = post_align(client, eval_clip(eval_utterances[0]), "hello", language=language)
    assert_problem(response, 422, "unsupported-language")


def test_language_the_backend_cannot_align(client, eval_utterances):
    response = post_align(client, eval_clip(eval_utterances[0]), "bonjour le monde", language="fr")
    assert "pocketsphinx" in assert_problem(response, 422, "unsupported-language")["detail"]


@pytest.mark.parametrize(
    "audio",
    [b"", b"just some text, honestly\n" * 20, bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8))],
    ids=["empty", "text", "random-bytes"],
)
def test_non_audio_uploads(client, audio):
    assert_problem(post_align(client, audio, "hello world"), 415, "unsupported-media-type")


@pytest.mark.parametrize(("kept_bytes", "slug"), [(44, "empty-audio"), (60, "audio-too-short")])
def test_truncated_wav(client, eval_utterances, kept_bytes, slug):
    assert_problem(post_align(client, eval_clip(eval_utterances[0])[:kept_bytes], "hello world"), 422, slug)


def test_decoded_duration_cap(client):
    response = post_align(client, silence_flac(3600.0, 16_000, 1), "hello")
    assert_problem(response, 422, "audio-too-long")


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("", "invalid-transcript"),
        ("— …", "invalid-transcript"),
        ("hello \u202eworld", "invalid-transcript"),
        ("x" * (IngressOptions().max_transcript_chars + 1), "transcript-too-long"),
        ("word " * 200_000, "transcript-too-long"),  # 1 MB: refused while the field streams
    ],
    ids=["empty", "punctuation-only", "bidi-override", "over-char-cap", "one-megabyte"],
)
def test_bad_transcripts(client, eval_utterances, text, slug):
    response = post_align(client, eval_clip(eval_utterances[0]), text)
    assert_problem(response, 422, slug)


def test_transcript_must_be_utf8(client, eval_utterances):
    files = {"audio": ("a.wav", eval_clip(eval_utterances[0]), "audio/wav"), "text": (None, b"caf\xe9 au lait")}
    assert_problem(client.post("/v1/align", files=files), 422, "invalid-transcript")


def test_implausible_transcript_for_the_audio(client):
    audio = encode(tone(1.0, 16_000), 16_000, "wav")
    response = post_align(client, audio, " ".join(["word"] * 500))
    assert_problem(response, 422, "invalid-transcript")


def test_upload_over_the_cap_is_refused_by_content_length_and_while_streaming(client):
    oversized = b"\0" * (TEST_MAX_UPLOAD_BYTES + 1)
    response = post_align(client, oversized, "hello")
    assert_problem(response, 413, "payload-too-large")

    def chunked():  # no Content-Length: the ingress must count while the body streams
        boundary = b"--cap"
        yield boundary + b'\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n'
        yield boundary + b'\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
        for _ in range(TEST_MAX_UPLOAD_BYTES // (1024 * 1024) + 1):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--cap--\r\n"

    response = client.post("/v1/align", content=chunked(), headers={"content-type": "multipart/form-data; boundary=cap"})
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload-too-large")


def test_unknown_route_and_method_are_problems(client):
    assert_problem(client.get("/v1/nope"), 404, "not-found")
    response = client.get("/v1/align")
    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "POST"


def test_service_still_serves_after_errors(client, eval_utterances):
    post_align(client, b"\xff\xfb\x90\x64" + bytes(2000), "hello")  # fake MP3 sync word
    utterance = eval_utterances[3]
    response = post_align(client, eval_clip(utterance), utterance["transcript"])
    assert response.status_code == 200
    assert len(response.json()["words"]) == len(utterance["words"])


def test_client_cannot_choose_its_own_timeout(client, eval_utterances):
    # Serve's proxy would honour this header (0.001 s -> 408); our proxy middleware strips it.
    utterance = eval_utterances[4]
    files = {"audio": ("clip.wav", eval_clip(utterance), "audio/wav")}
    headers = {"x-request-timeout-seconds": "0.001", "x-request-disconnect-disabled": "?1"}
    response = client.post("/v1/align", files=files, data={"text": utterance["transcript"]}, headers=headers)
    assert response.status_code == 200, response.text
