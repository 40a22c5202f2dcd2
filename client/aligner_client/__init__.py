"""Client for the forced-alignment service (API v1): align clips, run jobs for long audio.

    from aligner_client import Client
    client = Client("http://127.0.0.1:8000", api_key="...")   # or $FORCED_ALIGNER_URL / _API_KEY
    for word in client.align("clip.wav", "the transcript").words:
        print(word.text, word.start, word.end)

`AsyncClient` has the same methods for asyncio. Errors the service reports are raised as
`APIError` subclasses carrying its problem document (`type`, `status`, `detail`).
"""

from aligner_client.errors import (
    AlignerError,
    APIError,
    AuthenticationFailed,
    Conflict,
    ConnectionFailed,
    InvalidInput,
    JobFailed,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    Unavailable,
    WaitTimedOut,
)
from aligner_client.models import Alignment, JobInfo, JobPage, Problem, Progress, Word
from aligner_client.retry import NO_RETRIES, RetryPolicy
from aligner_client.sync import Client, Job
from aligner_client.version import __version__


def __getattr__(name: str):
    # The asyncio flavour on first use: importing asyncio costs a synchronous user ~90 ms.
    if name in ("AsyncClient", "AsyncJob"):
        from aligner_client import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'aligner_client' has no attribute {name!r}")

__all__ = [
    "AlignerError", "APIError", "Alignment", "AsyncClient", "AsyncJob", "AuthenticationFailed", "Client",
    "Conflict", "ConnectionFailed", "InvalidInput", "Job", "JobFailed", "JobInfo", "JobPage", "NO_RETRIES",
    "NotFound", "PermissionDenied", "Problem", "Progress", "RateLimited", "RetryPolicy", "ServerError",
    "Unavailable", "WaitTimedOut", "Word", "__version__",
]  # fmt: skip
