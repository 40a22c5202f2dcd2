"""Operator commands. API keys:

    python -m serve_app.cli keys create --owner NAME --scope align [--scope admin] [--plan standard] [--expires-in-days N]
    python -m serve_app.cli keys list [--owner NAME]
    python -m serve_app.cli keys show KEY_ID
    python -m serve_app.cli keys revoke KEY_ID
    python -m serve_app.cli keys rotate KEY_ID [--overlap-hours H]
    python -m serve_app.cli bans list
    python -m serve_app.cli bans lift SUBJECT          (as listed, e.g. ip:203.0.113.7)

Redis and the pepper come from the environment (ALIGNER_REDIS_URL, or ALIGNER_REDIS_SENTINELS for
Redis Sentinel; ALIGNER_API_KEY_PEPPER or ALIGNER_API_KEY_PEPPER_FILE), read by
`Environment.from_env()`. A new key is printed once, at creation or rotation, and can never be
shown again; nothing else ever prints a secret or a digest. A revocation reaches every replica
within IngressOptions.api_key_cache_s (once it can reach Redis: see serve_app.security.api_keys).

Exit status: 0 done, 1 no such key / refused, 2 usage or configuration error, 3 Redis unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime, timezone

from redis.exceptions import RedisError

from serve_app.security.abuse import AbuseMonitor
from serve_app.security.api_keys import MIN_PEPPER_BYTES, ApiKeyStore, KeyRecord, UnknownKey
from serve_app.security.redis_store import redis_client
from serve_app.settings import AbuseOptions, Environment, RedisSentinel

SECONDS_PER_DAY = 86400
SECONDS_PER_HOUR = 3600


def _when(timestamp: float | None, none: str = "-") -> str:
    if timestamp is None:
        return none
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(record: KeyRecord) -> list[tuple[str, str]]:
    return [
        ("key_id", record.key_id),
        ("owner", record.owner),
        ("scopes", " ".join(sorted(record.scopes))),
        ("plan", record.plan),
        ("state", record.state(time.time())),
        ("created_at", _when(record.created_at)),
        ("expires_at", _when(record.expires_at, "never")),
        ("revoked_at", _when(record.revoked_at)),
        ("last_used_at", _when(record.last_used_at, "never")),
        ("replaced_by", record.replaced_by or "-"),
    ]


def _print_record(record: KeyRecord) -> None:
    for name, value in _describe(record):
        print(f"{name}: {value}")


def _print_new_key(text: str, record: KeyRecord) -> None:
    print(f"api_key: {text}")
    _print_record(record)
    print("The api_key above is shown once and is not stored: keep it now.", file=sys.stderr)


def _print_table(records: list[KeyRecord]) -> None:
    columns = ["key_id", "owner", "scopes", "plan", "state", "expires_at", "last_used_at"]
    rows = [[dict(_describe(record))[column] for column in columns] for record in records]
    widths = [max(len(column), *(len(row[index]) for row in rows)) for index, column in enumerate(columns)]
    for row in [columns, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


async def _run_keys(arguments: argparse.Namespace, store: ApiKeyStore) -> int:
    command = arguments.keys_command
    if command == "create":
        expires_in_s = None if arguments.expires_in_days is None else arguments.expires_in_days * SECONDS_PER_DAY
        text, record = await store.create(arguments.owner, arguments.scope, arguments.plan, expires_in_s)
        _print_new_key(text, record)
    elif command == "list":
        _print_table(await store.list(arguments.owner))
    elif command == "show":
        shown = await store.get(arguments.key_id)
        if shown is None:
            raise UnknownKey(arguments.key_id)
        _print_record(shown)
    elif command == "revoke":
        _print_record(await store.revoke(arguments.key_id))
    elif command == "rotate":
        text, record = await store.rotate(arguments.key_id, arguments.overlap_hours * SECONDS_PER_HOUR)
        _print_new_key(text, record)
        old = await store.get(arguments.key_id)
        if old is not None:
            print(f"{arguments.key_id} keeps working until {_when(old.expires_at)}", file=sys.stderr)
    return 0


async def _run_bans(arguments: argparse.Namespace, monitor: AbuseMonitor) -> int:
    if arguments.bans_command == "list":
        for ban in await monitor.list_bans():
            print(f"{ban.subject}  reason={ban.reason}  offence={ban.offence}  remaining_s={ban.retry_after_s}")
        return 0
    if await monitor.lift(arguments.subject):
        return 0
    print(f"no such ban: {arguments.subject}", file=sys.stderr)
    return 1


OPERATOR_TIMEOUT_S = 5.0  # an operator waits longer than a request may


async def _main_async(arguments: argparse.Namespace, redis_url: str, sentinel: RedisSentinel | None, pepper: bytes) -> int:
    redis = redis_client(redis_url, sentinel, timeout_s=OPERATOR_TIMEOUT_S, max_connections=4)
    try:
        if arguments.group == "bans":
            return await _run_bans(arguments, AbuseMonitor(redis, AbuseOptions()))
        return await _run_keys(arguments, ApiKeyStore(redis, pepper))
    except UnknownKey as error:
        print(f"no such key: {error.args[0]}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as error:
        # The URL may embed a password: name the failure, not the address.
        print(f"cannot reach Redis ({type(error).__name__})", file=sys.stderr)
        return 3
    finally:
        await redis.aclose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve_app.cli", description="Forced aligner operator commands.")
    groups = parser.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)

    create = keys.add_parser("create", help="issue a new key (printed once)")
    create.add_argument("--owner", required=True, help="who the key is for (a person, team or service)")
    create.add_argument("--scope", action="append", required=True, help="repeat for several scopes, e.g. align")
    create.add_argument("--plan", default="standard", help="rate-limit plan name (IngressOptions.plans)")
    create.add_argument("--expires-in-days", type=float, default=None, help="default: never expires")

    listing = keys.add_parser("list", help="list keys (no secrets)")
    listing.add_argument("--owner", default=None)

    for name, help_text in (("show", "show one key (no secret)"), ("revoke", "revoke a key")):
        keys.add_parser(name, help=help_text).add_argument("key_id")

    rotate = keys.add_parser("rotate", help="issue a replacement; the old key works for the overlap")
    rotate.add_argument("key_id")
    rotate.add_argument("--overlap-hours", type=float, default=24.0)

    bans = groups.add_parser("bans", help="list or lift temporary bans").add_subparsers(dest="bans_command", required=True)
    bans.add_parser("list", help="active bans")
    bans.add_parser("lift", help="lift a ban and forget its offences").add_argument("subject")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        environment = Environment.from_env()
    except ValueError as error:  # names the variable and the bad value; secrets are never parsed here
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    pepper = environment.api_key_pepper.get_secret_value().encode() if environment.api_key_pepper else b""
    if arguments.group == "keys" and len(pepper) < MIN_PEPPER_BYTES:
        print(
            f"ALIGNER_API_KEY_PEPPER (or ALIGNER_API_KEY_PEPPER_FILE) must hold at least {MIN_PEPPER_BYTES} bytes",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_main_async(arguments, environment.redis_url.get_secret_value(), environment.redis_sentinel, pepper))


if __name__ == "__main__":
    sys.exit(main())
