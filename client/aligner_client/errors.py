"""The exceptions the client raises: every failure the service reports is its problem document,
typed by status, so callers catch what they can act on (`except RateLimited`, `except InvalidInput`).
"""

from __future__ import annotations

from aligner_client.models import JobInfo, Problem


class AlignerError(Exception):
    """Anything the client raises on purpose."""


class APIError(AlignerError):
    """The service answered with an error: its problem document, as `problem` and as attributes."""

    def __init__(self, problem: Problem, retry_after_s: float | None = None) -> None:
        super().__init__(f"{problem.status} {problem.title}: {problem.detail}" if problem.detail else f"{problem.status} {problem.title}")
        self.problem = problem
        self.type = problem.type
        self.slug = problem.slug
        self.status = problem.status
        self.title = problem.title
        self.detail = problem.detail
        self.retry_after_s = retry_after_s


class InvalidInput(APIError):
    """4xx: the request was refused for what it holds; sending it again changes nothing."""


class AuthenticationFailed(APIError):
    """401: no credential, or one the service does not accept."""


class PermissionDenied(APIError):
    """403: the credential lacks the scope."""


class NotFound(APIError):
    """404: no such resource (or a job that is not yours, which reads the same)."""


class Conflict(APIError):
    """409: the resource is not in a state that allows this (a job without a result yet)."""


class RateLimited(APIError):
    """429: over a quota; `retry_after_s` says when to come back."""


class Unavailable(APIError):
    """502/503/504: the service or one of its dependencies is down or saturated, for now."""


class ServerError(APIError):
    """500: a failure on the service's side."""


_BY_STATUS: dict[int, type[APIError]] = {
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def error_for(problem: Problem, retry_after_s: float | None) -> APIError:
    kind = _BY_STATUS.get(problem.status) or (InvalidInput if 400 <= problem.status < 500 else ServerError)
    return kind(problem, retry_after_s)


class ConnectionFailed(AlignerError):
    """The service could not be reached (or stopped answering) on every attempt; the last
    transport error is the `__cause__`."""


class JobFailed(AlignerError):
    """The job ended without a result: failed (with the service's problem) or cancelled."""

    def __init__(self, job: JobInfo) -> None:
        problem = job.error
        reason = f"{problem.title}: {problem.detail}" if problem else job.status
        super().__init__(f"job {job.id} {job.status}: {reason}")
        self.job = job
        self.problem = problem


class WaitTimedOut(AlignerError):
    """The job had not ended when the caller's wait timeout ran out (it goes on in the service)."""

    def __init__(self, job: JobInfo, timeout_s: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout_s:g} s")
        self.job = job
