"""Job state in Redis: the records, the owner's index, the work stream, and every transition.

Keys (under a namespace, "aligner:<Serve application>"):
    {ns}:job:{id}                    hash: the job's record (JobRecord), its transcript while it needs it
    {ns}:job:{id}:result             the words of a succeeded job (JSON), rendered when fetched
    {ns}:jobs:owner:{owner}          sorted set, sequence -> id: the owner's jobs, newest last
    {ns}:jobs:active:{owner}         set: the owner's queued and running jobs (the plan's cap)
    {ns}:jobs:running:{owner}        set: the owner's running jobs (the runners' fair share)
    {ns}:jobs:sequence:{owner}       counter: a total order of the owner's submissions (cursors)
    {ns}:jobs:idempotency:{owner}:{sha256(key)}   "job id|fingerprint" of an Idempotency-Key
    {ns}:jobs:queue                  stream: one entry per job to run; consumer group "runners"
    {ns}:jobs:states                 hash: how many jobs are queued and running (gauges)
    {ns}:jobs:expiring               sorted set, expires_at -> id: terminal jobs to delete

Every transition is one Lua script (resource files next to this module), so a job is in exactly
one state and ends in exactly one terminal state: a second finish, a finish by a stale attempt
(the job was redelivered to another runner meanwhile) or a finish after a cancellation writes
nothing and says so. Owners are principal keys (serve_app.security.ratelimit.principal_key);
`get` answers a foreign job exactly as a missing one, after the same single round trip.

Failure policy: this module never hides a Redis failure. Callers decide: the job API answers
503 + Retry-After (submissions are refused, never half-created: the create is one script), the
runner keeps what it computed and retries writing it until Redis answers (serve_app.jobs.runner).
Redis must run append-only (tools/local_services.py, deploy/kuberay) for jobs to outlive it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal, get_args

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from serve_app.security.redis_store import load_script

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
JOB_ID_PATTERN = r"^job_[0-9a-f]{32}$"

GROUP = "runners"
_KEY_BACKSTOP_S = 3600  # keys outlive their expiry by this much, in case no runner sweeps them
_IDEMPOTENCY_TTL_S = 7 * 86400  # bounded; a key names a job only while that job exists anyway


def namespace_of(application: str) -> str:
    """The key namespace of one Serve application's jobs."""
    return f"aligner:{application}"


def new_job_id() -> str:
    return f"job_{secrets.token_hex(16)}"  # 128 random bits: unguessable


@dataclass(frozen=True)
class NewJob:
    """What a submission leaves for the runner: the decoded audio (by reference) and the text."""

    id: str
    owner: str  # principal key
    principal_id: str  # for audit lines (never a secret)
    created_at: float
    language: str
    format: str  # the submitted output format: the default of GET .../result
    transcript: str
    duration: float  # decoded seconds, charged at submission
    pcm_path: str
    envelope_path: str
    audio_bucket: tuple[float, float]  # (capacity, refill per s) of the owner's audio bucket: refunds
    retain_s: float  # how long the result is kept once the job ends


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    principal_id: str
    status: JobStatus
    sequence: int
    attempt: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    language: str
    format: str
    duration: float
    pcm_path: str
    envelope_path: str
    audio_bucket: tuple[float, float]
    windows_done: int
    windows_total: int
    audio_seconds_done: float
    error: dict[str, Any] | None  # the problem document of a failed job

    @classmethod
    def from_hash(cls, job_id: str, fields: dict[str, str]) -> JobRecord:
        def number(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value not in (None, "") else None

        capacity, refill = (float(part) for part in fields["audio_bucket"].split(","))
        return cls(
            id=job_id,
            owner=fields["owner"],
            principal_id=fields["principal_id"],
            status=fields["status"],  # type: ignore[arg-type]
            sequence=int(fields["sequence"]),
            attempt=int(fields.get("attempt", 0)),
            created_at=float(fields["created_at"]),
            started_at=number("started_at"),
            finished_at=number("finished_at"),
            expires_at=number("expires_at"),
            language=fields["language"],
            format=fields["format"],
            duration=float(fields["duration"]),
            pcm_path=fields["pcm_path"],
            envelope_path=fields["envelope_path"],
            audio_bucket=(capacity, refill),
            windows_done=int(fields.get("windows_done", 0)),
            windows_total=int(fields.get("windows_total", 0)),
            audio_seconds_done=float(fields.get("audio_seconds_done", 0)),
            error=json.loads(fields["error"]) if fields.get("error") else None,
        )


class Foreign:
    """Someone else's job (see JobStore.lookup)."""


FOREIGN = Foreign()


def _unexpired(job_id: str, fields: dict[str, str], now: float) -> JobRecord | None:
    """The record of a job hash, or None once its retention is over (the sweep may not have run yet)."""
    record = JobRecord.from_hash(job_id, fields)
    return None if record.expires_at is not None and record.expires_at <= now else record


@dataclass(frozen=True)
class Created:
    sequence: int


@dataclass(frozen=True)
class AtCap:
    active: int


@dataclass(frozen=True)
class Replay:
    """An Idempotency-Key seen before: the job it created, or why it cannot be replayed."""

    job_id: str | None  # None: the first submission with this key is still being worked on
    same_request: bool


@dataclass(frozen=True)
class Started:
    attempt: int
    record: JobRecord


@dataclass(frozen=True)
class Ended:
    """A finish that did nothing: the job was already `status` (terminal), gone, or redelivered."""

    status: str


@dataclass(frozen=True)
class Deferred:
    """Its owner already runs its share of jobs: queued again, behind everyone else's."""


@dataclass(frozen=True)
class Finished:
    previous: str  # the status it ended from: "queued" means it never ran


class JobStore:
    def __init__(self, redis: Redis, namespace: str = "aligner") -> None:
        """`namespace` prefixes every key: one per Serve application sharing a Redis (the test suite runs two)."""
        self.redis = redis
        self._namespace = namespace
        self.queue = f"{namespace}:jobs:queue"
        self._states = f"{namespace}:jobs:states"
        self._expiring = f"{namespace}:jobs:expiring"
        self._submit = load_script(redis, "job_submit.lua", __package__)
        self._start = load_script(redis, "job_start.lua", __package__)
        self._progress = load_script(redis, "job_progress.lua", __package__)
        self._finish = load_script(redis, "job_finish.lua", __package__)

    def _job_key(self, job_id: str) -> str:
        return f"{self._namespace}:job:{job_id}"

    def _result_key(self, job_id: str) -> str:
        return f"{self._namespace}:job:{job_id}:result"

    def _owner_index(self, owner: str) -> str:
        return f"{self._namespace}:jobs:owner:{owner}"

    def _active(self, owner: str) -> str:
        return f"{self._namespace}:jobs:active:{owner}"

    def _running(self, owner: str) -> str:
        return f"{self._namespace}:jobs:running:{owner}"

    def _sequence(self, owner: str) -> str:
        return f"{self._namespace}:jobs:sequence:{owner}"

    def _idempotency_key(self, owner: str, key: str) -> str:
        return f"{self._namespace}:jobs:idempotency:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"

    # -- the API's side ------------------------------------------------------------------------

    async def reserve_idempotency(self, owner: str, key: str, fingerprint: str, ttl_s: float) -> Replay | None:
        """Claim `key` for a new submission (None), or say what it already stands for."""
        name = self._idempotency_key(owner, key)
        if await self.redis.set(name, f"|{fingerprint}", nx=True, ex=max(int(ttl_s), 1)):
            return None
        value = await self.redis.get(name)
        if value is None:  # expired between the two calls: as good as in use, the client retries
            return Replay(None, True)
        job_id, _, seen = value.partition("|")
        if job_id and not await self.redis.exists(self._job_key(job_id)):  # that job has expired: start afresh
            await self.redis.delete(name)
            return await self.reserve_idempotency(owner, key, fingerprint, ttl_s)
        return Replay(job_id or None, hmac.compare_digest(seen, fingerprint))

    async def release_idempotency(self, owner: str, key: str, fingerprint: str) -> None:
        """Give up a reservation whose submission failed, so a retry can proceed."""
        name = self._idempotency_key(owner, key)
        if await self.redis.get(name) == f"|{fingerprint}":
            await self.redis.delete(name)

    async def active_count(self, owner: str) -> int:
        return int(await self.redis.scard(self._active(owner)))

    async def submit(self, job: NewJob, max_active: int, idempotency: tuple[str, str] | None) -> Created | AtCap:
        fields = {
            "owner": job.owner,
            "principal_id": job.principal_id,
            "created_at": repr(job.created_at),
            "language": job.language,
            "format": job.format,
            "transcript": job.transcript,
            "duration": repr(job.duration),
            "pcm_path": job.pcm_path,
            "envelope_path": job.envelope_path,
            "audio_bucket": f"{job.audio_bucket[0]!r},{job.audio_bucket[1]!r}",
            "retain_s": repr(job.retain_s),
        }
        idempotency_name, idempotency_value = "", ""
        if idempotency is not None:
            key, fingerprint = idempotency
            idempotency_name, idempotency_value = self._idempotency_key(job.owner, key), f"{job.id}|{fingerprint}"
        created, number = await self._submit(
            keys=[self._job_key(job.id), self._owner_index(job.owner), self._active(job.owner), self._sequence(job.owner), self.queue, self._states, idempotency_name],
            args=[job.id, max_active, idempotency_value, _IDEMPOTENCY_TTL_S, *(item for pair in fields.items() for item in pair)],
        )
        return Created(int(number)) if int(created) else AtCap(int(number))

    async def get(self, job_id: str, now: float) -> JobRecord | None:
        """The job, whoever owns it (the runner, admins), unless it is gone or past its retention."""
        found = await self.lookup(job_id, None, now)
        return found if isinstance(found, JobRecord) else None

    async def lookup(self, job_id: str, owner: str | None, now: float) -> JobRecord | Foreign | None:
        """The job if `owner` owns it (None: any owner); Foreign if another does; None if there is none.

        One round trip whichever it is; callers answer Foreign exactly as None (and audit it).
        """
        fields = await self.redis.hgetall(self._job_key(job_id))
        if not fields or "owner" not in fields:
            return None
        record = _unexpired(job_id, fields, now)
        if record is None:
            return None
        if owner is not None and not hmac.compare_digest(fields["owner"], owner):
            return FOREIGN
        return record

    async def result(self, job_id: str) -> dict[str, Any] | None:
        text = await self.redis.get(self._result_key(job_id))
        return json.loads(text) if text else None

    async def list(
        self, owner: str, *, before: int | None, limit: int, status: str | None, now: float, max_scanned: int = 1000
    ) -> tuple[list[JobRecord], int | None]:
        """The owner's jobs newest first, from sequence `before` (exclusive); and the next cursor.

        A status filter reads at most `max_scanned` entries per call: the cursor then says where to
        go on, so a page may hold fewer than `limit` jobs even when more follow.
        """
        index = self._owner_index(owner)
        high = f"({before}" if before is not None else "+inf"
        found: list[JobRecord] = []
        scanned = 0
        while len(found) < limit and scanned < max_scanned:
            batch = await self.redis.zrevrangebyscore(index, high, "-inf", start=0, num=min(limit * 2, 200), withscores=True)
            if not batch:
                return found, None
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in batch:
                    pipe.hgetall(self._job_key(job_id))
                hashes = await pipe.execute()
            gone = []
            for (job_id, sequence), fields in zip(batch, hashes):
                scanned += 1
                high = f"({int(sequence)}"
                if not fields or "owner" not in fields:
                    gone.append(job_id)
                    continue
                record = _unexpired(job_id, fields, now)
                if record is not None and (status is None or record.status == status):
                    found.append(record)
                    if len(found) == limit:
                        break
            if gone:
                await self.redis.zrem(index, *gone)
        more = await self.redis.zrevrangebyscore(index, high, "-inf", start=0, num=1)
        return found, (int(high[1:]) if more else None)

    async def cancel(self, job_id: str, now: float) -> Finished | Ended:
        """Queued or running -> cancelled (a running attempt notices at its next heartbeat)."""
        return await self.finish(job_id, "cancelled", attempt=None, now=now, owner=None)

    async def delete(self, record: JobRecord) -> None:
        """Remove an ended job's record and result (its audio is already gone)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._job_key(record.id), self._result_key(record.id))
            pipe.zrem(self._owner_index(record.owner), record.id)
            pipe.zrem(self._expiring, record.id)
            await pipe.execute()

    async def state_counts(self) -> dict[str, int]:
        counts = await self.redis.hgetall(self._states)
        return {status: max(int(counts.get(status, 0)), 0) for status in ("queued", "running")}

    # -- the runner's side -----------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.queue, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def next_entry(self, consumer: str, block_ms: int) -> tuple[str, str] | None:
        """(stream entry id, job id) of a new entry for `consumer`, or None after `block_ms`."""
        reply = await self.redis.xreadgroup(GROUP, consumer, {self.queue: ">"}, count=1, block=block_ms)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                return entry_id, fields.get("job", "")
        return None

    async def claim_abandoned(self, consumer: str, min_idle_ms: int) -> tuple[str, str] | None:
        """An entry whose consumer has not touched it for `min_idle_ms` (it died): redelivery."""
        _, claimed, *_ = await self.redis.xautoclaim(self.queue, GROUP, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=1)
        for entry_id, fields in claimed:
            return entry_id, (fields or {}).get("job", "")
        return None

    async def keep_claimed(self, consumer: str, entry_id: str) -> None:
        """Reset the entry's idle time: its consumer is alive and still working on it."""
        await self.redis.xclaim(self.queue, GROUP, consumer, min_idle_time=0, message_ids=[entry_id], justid=True)

    async def acknowledge(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.queue, GROUP, entry_id)
            pipe.xdel(self.queue, entry_id)
            await pipe.execute()

    async def start(self, job_id: str, consumer: str, now: float, max_attempts: int, max_running_per_owner: int) -> Started | Ended | Deferred | int:
        """Begin an attempt: Started, Ended (nothing to do), Deferred, or the attempt number when attempts ran out."""
        owner = await self.redis.hget(self._job_key(job_id), "owner")
        if owner is None:
            return Ended("gone")
        outcome, *rest = await self._start(
            keys=[self._job_key(job_id), self._states, self._running(owner)], args=[consumer, repr(now), max_attempts, job_id, max_running_per_owner]
        )
        if outcome in ("gone", "done"):
            return Ended(rest[0] if rest else "gone")
        if outcome == "deferred":
            return Deferred()
        if outcome == "exhausted":
            return int(rest[0])
        record = await self.get(job_id, now)
        if record is None:
            return Ended("gone")
        return Started(int(rest[0]), record)

    async def requeue(self, entry_id: str, job_id: str) -> None:
        """Put a deferred job at the back of the stream (a new entry) and drop its old entry."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.queue, {"job": job_id})
            pipe.xack(self.queue, GROUP, entry_id)
            pipe.xdel(self.queue, entry_id)
            await pipe.execute()

    async def transcript(self, job_id: str) -> str | None:
        return await self.redis.hget(self._job_key(job_id), "transcript")

    async def status(self, job_id: str) -> tuple[str | None, int | None]:
        """(status, attempt) of a job; (None, None) when it is gone."""
        status, attempt = await self.redis.hmget(self._job_key(job_id), ["status", "attempt"])
        return status, int(attempt) if attempt is not None else None

    async def progress(self, job_id: str, attempt: int, **fields: float | int) -> bool:
        args = [attempt, *(item for name, value in fields.items() for item in (name, repr(value)))]
        return bool(await self._progress(keys=[self._job_key(job_id)], args=args))

    async def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        attempt: int | None,
        now: float,
        owner: str | None,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Finished | Ended:
        if owner is None:
            owner = await self.redis.hget(self._job_key(job_id), "owner")
            if owner is None:
                return Ended("gone")
        ended, previous = await self._finish(
            keys=[self._job_key(job_id), self._result_key(job_id), self._active(owner), self._states, self._expiring, self._running(owner)],
            args=[
                job_id, status, "" if attempt is None else attempt, repr(now),
                json.dumps(result, separators=(",", ":")) if result is not None else "",
                json.dumps(error, separators=(",", ":")) if error is not None else "",
                _KEY_BACKSTOP_S,
            ],
        )  # fmt: skip
        return Finished(previous) if int(ended) else Ended(previous)

    async def expired(self, now: float, count: int = 100) -> list[str]:
        """Ids of ended jobs whose retention is over (to delete, with their audit line)."""
        return list(await self.redis.zrangebyscore(self._expiring, "-inf", repr(now), start=0, num=count))

    async def expire(self, job_id: str) -> str | None:
        """Delete an expired job's record and result; its owner, or None when it was already gone."""
        owner = await self.redis.hget(self._job_key(job_id), "owner")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._job_key(job_id), self._result_key(job_id))
            pipe.zrem(self._expiring, job_id)
            if owner is not None:
                pipe.zrem(self._owner_index(owner), job_id)
            await pipe.execute()
        return owner

    async def queued_audio(self) -> set[str]:
        """The spool paths of every job with an entry in the stream: the audio no sweep may take.

        Every job not yet ended has one (submission adds it in the same script, a deferral swaps it
        in one transaction, and it is acknowledged only after the job ended or is gone).
        """
        job_ids = {fields.get("job", "") for _, fields in await self.redis.xrange(self.queue)}
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self._job_key(job_id), ["pcm_path", "envelope_path"])
            paths = await pipe.execute()
        return {path for pair in paths for path in pair if path}

    async def queue_depth(self) -> int:
        """Entries not yet acknowledged: waiting for a runner or being worked on."""
        try:
            groups = await self.redis.xinfo_groups(self.queue)
        except ResponseError:  # no stream yet
            return 0
        for group in groups:
            if group["name"] == GROUP:
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return 0
