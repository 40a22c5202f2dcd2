"""Admin routes under /v1/admin: API keys and bans. Every route requires the `admin` scope.

Secrets appear exactly once, in the answer that creates or rotates a key (sent with
`Cache-Control: no-store`, so no cache keeps it); no route ever returns a digest. Bodies are read
only after authentication, under a 64 KiB cap (serve_app.api.json_body). Every action is written
to the audit log.
"""

# No `from __future__ import annotations`: FastAPI resolves these annotations at runtime.

import time

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from serve_app.api.dependencies import authorized, gate
from serve_app.api.gate import Caller, Gate
from serve_app.api.json_body import json_request_body, read_json_body
from serve_app.api.jobs import jobs, list_page
from serve_app.api.models import BanOut, JobList, KeyCreate, KeyCreated, KeyOut, KeyRotate, problem_responses
from serve_app.jobs.store import JobStore
from serve_app.problems import Problem
from serve_app.security.api_keys import KeyRecord, UnknownKey

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=problem_responses(400, 401, 403, 404, 422, 429, 503))
admin = authorized("admin")

_SECONDS_PER_DAY = 86_400
_BAN_SUBJECT = r"^(ip|principal):[^\s]{1,200}$"  # as GET /v1/admin/bans lists them
_OWNER = r"^(api_key|jwt):[!-~]{1,200}$"  # a principal key: "api_key:<key id>" or "jwt:<issuer tag>:<client id>"


def _key_out(record: KeyRecord) -> KeyOut:
    return KeyOut(
        key_id=record.key_id,
        owner=record.owner,
        scopes=sorted(record.scopes),
        plan=record.plan,
        state=record.state(time.time()),
        created_at=record.created_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
        last_used_at=record.last_used_at,
        replaced_by=record.replaced_by,
    )


def _known_plan(gate: Gate, plan: str) -> None:
    if plan not in gate.options.plans:
        raise Problem("invalid-request", f"unknown plan; configured plans: {', '.join(sorted(gate.options.plans))}")


@router.get("/jobs", response_model=JobList, summary="One owner's jobs, newest first (as GET /v1/jobs lists the caller's)")
async def list_owner_jobs(
    owner: str = Query(pattern=_OWNER, description='A principal key: "api_key:<key id>" or "jwt:<issuer tag>:<client id>".'),
    status: str | None = Query(None),
    limit: int | None = Query(None),
    cursor: str | None = Query(None, max_length=32),
    caller: Caller = Depends(admin),
    gate: Gate = Depends(gate),
    store: JobStore = Depends(jobs),
) -> JobList:
    gate.audit.record(caller.audit, "job", "listed", "admin", owner=owner)
    return await list_page(store, gate, owner, status, limit, cursor)


@router.get("/keys", response_model=list[KeyOut], summary="List API keys (never their secrets)")
async def list_keys(owner: str | None = Query(None, max_length=64), caller: Caller = Depends(admin), gate: Gate = Depends(gate)):
    return [_key_out(record) for record in await gate.api_keys.list(owner)]


@router.post(
    "/keys",
    response_model=KeyCreated,
    status_code=201,
    summary="Create an API key (the secret is shown once)",
    openapi_extra={"requestBody": json_request_body(KeyCreate)},
    responses=problem_responses(413),
)
async def create_key(request: Request, response: Response, caller: Caller = Depends(admin), gate: Gate = Depends(gate)):
    body = await read_json_body(request, KeyCreate)
    _known_plan(gate, body.plan)
    expires_in_s = body.expires_in_days * _SECONDS_PER_DAY if body.expires_in_days else None
    text, record = await gate.api_keys.create(body.owner, body.scopes, body.plan, expires_in_s)
    gate.audit.record(caller.audit, "admin", "allowed", "key-created", key_id=record.key_id, plan=record.plan)
    response.headers["Cache-Control"] = "no-store"
    return KeyCreated(key=text, record=_key_out(record))


@router.get("/keys/{key_id}", response_model=KeyOut, summary="Show one API key")
async def show_key(key_id: str, caller: Caller = Depends(admin), gate: Gate = Depends(gate)):
    record = await gate.api_keys.get(key_id)
    if record is None:
        raise Problem("not-found", "no such key")
    return _key_out(record)


@router.post("/keys/{key_id}/revoke", response_model=KeyOut, summary="Revoke an API key")
async def revoke_key(key_id: str, caller: Caller = Depends(admin), gate: Gate = Depends(gate)):
    try:
        record = await gate.api_keys.revoke(key_id)
    except UnknownKey:
        raise Problem("not-found", "no such key") from None
    gate.audit.record(caller.audit, "admin", "allowed", "key-revoked", key_id=key_id)
    return _key_out(record)


@router.post(
    "/keys/{key_id}/rotate",
    response_model=KeyCreated,
    status_code=201,
    summary="Issue a successor; the old key lives for the overlap",
    openapi_extra={"requestBody": json_request_body(KeyRotate)},
    responses=problem_responses(413),
)
async def rotate_key(
    key_id: str, request: Request, response: Response, caller: Caller = Depends(admin), gate: Gate = Depends(gate)
):
    body = await read_json_body(request, KeyRotate)
    try:
        text, record = await gate.api_keys.rotate(key_id, body.overlap_hours * 3600)
    except UnknownKey:
        raise Problem("not-found", "no such key") from None
    except ValueError as refused:  # a revoked or expired key cannot be rotated
        raise Problem("invalid-request", str(refused)) from None
    gate.audit.record(caller.audit, "admin", "allowed", "key-rotated", key_id=key_id, successor=record.key_id)
    response.headers["Cache-Control"] = "no-store"
    return KeyCreated(key=text, record=_key_out(record))


@router.get("/bans", response_model=list[BanOut], summary="List active bans")
async def list_bans(caller: Caller = Depends(admin), gate: Gate = Depends(gate)):
    return [BanOut(subject=ban.subject, reason=ban.reason, offence=ban.offence, retry_after_s=ban.retry_after_s) for ban in await gate.abuse.list_bans()]


# `:path`: an IPv6 subject is a /64 ("ip:2001:db8::/64"), whose slash must not end the route.
@router.delete("/bans/{subject:path}", status_code=204, summary="Lift a ban (subject as listed, e.g. ip:203.0.113.7 or ip:2001:db8::/64)")
async def lift_ban(subject: str = Path(pattern=_BAN_SUBJECT), caller: Caller = Depends(admin), gate: Gate = Depends(gate)):
    if not await gate.abuse.lift(subject):
        raise Problem("not-found", "no such ban")
    gate.audit.record(caller.audit, "admin", "allowed", "ban-lifted", subject=subject)
