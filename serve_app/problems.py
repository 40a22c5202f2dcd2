"""RFC 9457 problem details: one stable `type` per cause, and the exception that carries one.

Every error the API returns is `application/problem+json` with `type`, `title`, `status`, `detail`
and `instance` (the request id). `detail` is written for the client and never carries a traceback,
a remote exception's text, a credential, audio or transcript content.

Media and backend modules raise errors with a `reason` code; those codes are problem slugs here, so
the cause reads the same in code, in the response and in the docs (docs/errors.md). No web framework
here: the pipeline raises `Problem` too, and serve_app.api.problems renders it for FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:forced-aligner:problem:"

@dataclass(frozen=True)
class ProblemType:
    slug: str
    status: int
    title: str
    registered_uri: str | None = None  # an IANA-registered type, where one exists

    @property
    def uri(self) -> str:
        return self.registered_uri or PROBLEM_TYPE_BASE + self.slug


# The IANA HTTP Problem Types registry entries defined by draft-ietf-httpapi-ratelimit-headers.
_IANA = "https://iana.org/assignments/http-problem-types#"


_CATALOGUE = [
    # request shape
    ProblemType("invalid-request", 400, "The request is malformed"),
    ProblemType("not-found", 404, "No such resource"),
    ProblemType("method-not-allowed", 405, "Method not allowed on this resource"),
    ProblemType("request-timeout", 408, "The request took too long to arrive"),
    ProblemType("payload-too-large", 413, "The request body exceeds the size limit"),
    ProblemType("multipart-required", 415, "The request body must be multipart/form-data"),
    ProblemType("unsupported-media-type", 415, "The upload is not an accepted audio format"),
    # transcript
    ProblemType("invalid-transcript", 422, "The transcript cannot be aligned"),
    ProblemType("transcript-too-long", 422, "The transcript exceeds the length limit"),
    ProblemType("unsupported-language", 422, "The language is not supported"),
    ProblemType("malware-detected", 422, "The upload was refused by the malware scanner"),
    # decoded audio
    ProblemType("undecodable-audio", 422, "The audio could not be decoded"),
    ProblemType("empty-audio", 422, "The audio contains no samples"),
    ProblemType("audio-too-long", 422, "The audio exceeds the duration limit"),
    ProblemType("audio-too-short", 422, "The audio is too short to align"),
    ProblemType("too-many-channels", 422, "The audio has too many channels"),
    ProblemType("sample-rate-too-high", 422, "The audio's sample rate is too high"),
    ProblemType("not-single-audio-stream", 422, "The upload must hold exactly one audio stream and no video"),
    ProblemType("decode-timeout", 422, "Decoding the audio took too long"),
    # alignment
    ProblemType("no-alignment-found", 422, "The transcript could not be aligned to the audio"),
    ProblemType("transcript-audio-mismatch", 422, "The transcript does not match the audio"),
    ProblemType("unpronounceable-unit", 422, "The transcript has a word the backend cannot pronounce"),
    # authentication and traffic control
    ProblemType("job-result-unavailable", 409, "The job has no result"),
    ProblemType("idempotency-key-in-use", 409, "A request with this Idempotency-Key is still being processed"),
    ProblemType("idempotency-key-reused", 422, "This Idempotency-Key was used for a different request"),
    ProblemType("unauthenticated", 401, "A valid credential is required"),
    ProblemType("insufficient-scope", 403, "The credential lacks the required scope"),
    ProblemType("quota-exceeded", 429, "Request quota exceeded", _IANA + "quota-exceeded"),
    ProblemType("abnormal-usage-detected", 429, "Abnormal usage detected", _IANA + "abnormal-usage-detected"),
    ProblemType("temporary-reduced-capacity", 503, "Temporarily reduced capacity", _IANA + "temporary-reduced-capacity"),
    # server side
    ProblemType("service-unavailable", 503, "The service is temporarily unavailable"),
    ProblemType("internal-error", 500, "Internal error"),
]
PROBLEM_TYPES: Mapping[str, ProblemType] = {problem.slug: problem for problem in _CATALOGUE}


class Problem(Exception):
    """Raise anywhere in the request path to answer with a problem document."""

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ):
        super().__init__(detail)
        self.type = PROBLEM_TYPES[slug]
        self.detail = detail
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})


def unavailable(detail: str, retry_after_s: int) -> Problem:
    """A 503 that tells the client when to come back."""
    return Problem("service-unavailable", detail, headers={"Retry-After": str(retry_after_s)})


def problem_body(problem: Problem, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem.type.uri,
        "title": problem.type.title,
        "status": problem.type.status,
        "detail": problem.detail,
        **problem.extensions,
    }
    if request_id:
        body["instance"] = f"urn:request:{request_id}"
    return body
