"""Job routes under /v1/jobs: status, result, list, cancel/delete (POST /v1/jobs is the Ingress's,
next to POST /v1/align, whose steps it shares).

Object-level authorization (OWASP API1): every route looks the job up with the caller's principal
key as the owner, in one Redis round trip. Someone else's job answers exactly what an id that
never existed (or has expired) answers, 404 `not-found`, and is audited as a denied access. Ids
that are not job ids at all are 404 too, before any lookup. The `align` scope is required, as for
POST /v1/align; admins list any owner's jobs through /v1/admin/jobs (serve_app.api.admin).

DELETE on a queued or running job cancels it (its audio is deleted at once; the running attempt
stops at its next heartbeat) and answers the job, now `cancelled`; audio seconds are refunded when
it had not started. DELETE on an ended job deletes its record and result: 204, then 404.

Failure policy: Redis down answers 503 + Retry-After (job state lives there); nothing is guessed.
"""

# No `from __future__ import annotations`: FastAPI resolves these annotations at runtime.

import re
import time
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response

from serve_app import metrics
from serve_app.api.dependencies import authorized, gate
from serve_app.api.gate import Caller, Gate
from serve_app.api.models import JobLinks, JobList, JobOut, JobProgress, problem_responses
from serve_app.api.render import render_alignment
from serve_app.jobs.store import JOB_ID_PATTERN, JOB_STATUSES, Finished, Foreign, JobRecord, JobStore
from serve_app.media.spool import Spool
from serve_app.problems import Problem, unavailable
from serve_app.security.redis_store import STORE_ERRORS
from serve_app.text.formats import OutputFormat
from serve_app.text.timing import WordTiming

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problem_responses(400, 401, 403, 404, 429, 503))
align = authorized("align")

_JOB_ID = re.compile(JOB_ID_PATTERN)
_T = TypeVar("_T")


def jobs(request: Request) -> JobStore:
    return request.app.state.jobs  # built by the Ingress replica (deployments/ingress.py)


def job_spool(request: Request) -> Spool:
    return request.app.state.job_spool


def job_out(record: JobRecord) -> JobOut:
    path = f"/v1/jobs/{record.id}"
    return JobOut(
        id=record.id,
        status=record.status,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        expires_at=record.expires_at,
        language=record.language,
        format=OutputFormat(record.format),
        duration=round(record.duration, 3),
        progress=JobProgress(
            windows_done=record.windows_done,
            windows_total=record.windows_total,
            audio_seconds_done=record.audio_seconds_done,
            audio_seconds_total=round(record.duration, 3),
        ),
        error=record.error,
        links=JobLinks(self=path, result=f"{path}/result"),
    )


async def stored(call: Awaitable[_T], gate: Gate) -> _T:
    """A job-store call; Redis down is a 503 with Retry-After (counted), never a guess."""
    try:
        return await call
    except STORE_ERRORS:
        metrics.DEPENDENCY_ERRORS.inc(tags={"dependency": "redis", "use": "jobs"})
        raise unavailable("the job store is unavailable; retry later", gate.options.retry_after_s) from None


async def _own_job(job_id: str, caller: Caller, gate: Gate, store: JobStore) -> JobRecord:
    missing = Problem("not-found", "no such job")
    if not _JOB_ID.match(job_id):
        raise missing
    found = await stored(store.lookup(job_id, caller.principal_key, time.time()), gate)
    if isinstance(found, Foreign):
        gate.audit.record(caller.audit, "job", "denied", "not-owner", job_id=job_id)
        raise missing
    if found is None:
        raise missing
    return found


@router.get("/{job_id}", response_model=JobOut, summary="A job's status and progress")
async def get_job(job_id: str, caller: Caller = Depends(align), gate: Gate = Depends(gate), store: JobStore = Depends(jobs)) -> JobOut:
    return job_out(await _own_job(job_id, caller, gate, store))


@router.get(
    "/{job_id}/result",
    summary="A succeeded job's words, in the submitted format or ?format=",
    responses={
        200: {
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/AlignResponse"}},
                "application/x-subrip": {"schema": {"type": "string"}},
                "text/vtt": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}},
            }
        },
        **problem_responses(409),
    },
)
async def get_result(
    job_id: str,
    format: OutputFormat | None = Query(None, description="Default: the format the job was submitted with."),
    caller: Caller = Depends(align),
    gate: Gate = Depends(gate),
    store: JobStore = Depends(jobs),
) -> Response:
    record = await _own_job(job_id, caller, gate, store)
    if record.status != "succeeded":
        raise Problem("job-result-unavailable", f"the job is {record.status}; a result exists once it has succeeded")
    result = await stored(store.result(record.id), gate)
    if result is None:  # expired between the two reads
        raise Problem("not-found", "no such job")
    return render_alignment(
        format or OutputFormat(record.format),
        id=record.id,
        language=record.language,
        duration=result["duration"],
        backend=result["backend"],
        model=result["model"],
        words=[_stored_word(*entry) for entry in result["words"]],
    )


def _stored_word(text: str, start: float, end: float, confidence: float | None = None, flags: list[str] = ()) -> WordTiming:
    """A stored word; results stored before confidence existed have none (null in the answer)."""
    return WordTiming(text, start, end, confidence, tuple(flags))


async def list_page(
    store: JobStore, gate: Gate, owner: str, status: str | None, limit: int | None, cursor: str | None
) -> JobList:
    """One page of `owner`'s jobs (also GET /v1/admin/jobs)."""
    page_size = gate.options.jobs.max_page_size
    if limit is not None and not 1 <= limit <= page_size:
        raise Problem("invalid-request", f"limit must be between 1 and {page_size}")
    if status is not None and status not in JOB_STATUSES:
        raise Problem("invalid-request", f"status must be one of: {', '.join(JOB_STATUSES)}")
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise Problem("invalid-request", "cursor must be a next_cursor this API returned")
    records, following = await stored(
        store.list(owner, before=int(cursor) if cursor else None, limit=limit or min(20, page_size), status=status, now=time.time()), gate
    )
    return JobList(jobs=[job_out(record) for record in records], next_cursor=None if following is None else str(following))


@router.get("", response_model=JobList, summary="The caller's own jobs, newest first")
async def list_jobs(
    status: str | None = Query(None, description="Only jobs in this status."),
    limit: int | None = Query(None, description="Jobs per page (default 20, at most jobs.max_page_size)."),
    cursor: str | None = Query(None, max_length=32),
    caller: Caller = Depends(align),
    gate: Gate = Depends(gate),
    store: JobStore = Depends(jobs),
) -> JobList:
    return await list_page(store, gate, caller.principal_key, status, limit, cursor)


@router.delete(
    "/{job_id}",
    response_model=JobOut,
    summary="Cancel a queued or running job (200, the job); delete an ended one (204)",
    responses={204: {"description": "The ended job, its result and record are deleted."}},
)
async def delete_job(
    job_id: str,
    caller: Caller = Depends(align),
    gate: Gate = Depends(gate),
    store: JobStore = Depends(jobs),
    spool: Spool = Depends(job_spool),
):
    record = await _own_job(job_id, caller, gate, store)
    if record.status in ("queued", "running"):
        ended = await stored(store.cancel(record.id, time.time()), gate)
        if isinstance(ended, Finished):
            spool.remove(record.pcm_path)
            spool.remove(record.envelope_path)
            refund = ended.previous == "queued"  # charged for work that never started
            if refund:
                await gate.refund_audio(caller, record.duration)
            metrics.JOBS.inc(tags={"event": "cancelled"})
            gate.audit.record(caller.audit, "job", "cancelled", ended.previous, job_id=record.id, refunded=refund)
        return job_out(await _own_job(job_id, caller, gate, store))
    await stored(store.delete(record), gate)
    metrics.JOBS.inc(tags={"event": "deleted"})
    gate.audit.record(caller.audit, "job", "deleted", record.status, job_id=record.id)
    return Response(status_code=204)
