"""The ``signalbox`` command: serve, migrate, rebuild, token create/list/revoke (and the
client side: send, tail, audit, replay)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.auth import Scope, TokenStore
from pipeline.config import Settings
from pipeline.errors import SchemaMismatch, SignalboxError
from pipeline.log import EventLog
from pipeline.log.backends import (
    DATABASE_ERRORS,
    backend_kind,
    create_engines,
    redacted_url,
    sqlite_path,
)

if TYPE_CHECKING:
    from pipeline.processing.rebuild import RebuildReport

# Imports: each command loads what it uses and no more. The client side (replay: send, tail,
# audit, replay) is loaded only for its commands, and for the parser of them all; Alembic,
# the server (uvicorn and the application) and the rebuild only by the commands that use them.

SERVER_COMMANDS = frozenset({"serve", "rebuild", "migrate", "token"})


def build_parser(*, client_commands: bool = True) -> argparse.ArgumentParser:
    """The parser of every command (without the client side's: enough to parse those of the
    server, whose subparsers are the same either way)."""
    parser = argparse.ArgumentParser(
        prog="signalbox",
        description="Signalbox: a durable log of trading signals. Server side: serve, migrate, "
                    "rebuild, token. Client side: send, tail, audit, replay.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="upgrade the schema, then serve HTTP and /ws")
    _setting_flags(serve)
    if client_commands:
        from replay.audit_cli import add_commands as add_audit_commands  # noqa: PLC0415
        from replay.commands import add_commands as add_client_commands  # noqa: PLC0415
        from replay.history import add_commands as add_history_commands  # noqa: PLC0415

        add_client_commands(commands)
        add_audit_commands(commands)
        add_history_commands(commands)

    rebuild_cmd = commands.add_parser(
        "rebuild", help="make the signals projection again from the log, compare it with the "
                        "live one, and replace the live one only with --swap")
    _database_flag(rebuild_cmd)
    rebuild_cmd.add_argument("--swap", action="store_true",
                             help="replace the live projection with the rebuilt one")
    rebuild_cmd.add_argument("--json", action="store_true", help="print the report as JSON")

    migrate_cmd = commands.add_parser("migrate", help="upgrade the schema and exit")
    _database_flag(migrate_cmd)

    token = commands.add_parser("token", help="manage tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a token and print it once")
    create.add_argument("name")
    create.add_argument("--scope", action="append", required=True,
                        choices=[s.value for s in Scope], help="repeat for several scopes")
    create.add_argument("--expires", type=datetime.fromisoformat,
                        help="expiry time, ISO 8601 (UTC when no offset is given)")
    _database_flag(create)
    listing = token_commands.add_parser("list", help="list tokens (never their secrets)")
    _database_flag(listing)
    revoke = token_commands.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    _database_flag(revoke)
    return parser


# Secrets are never flags: a command line is visible to every user of the machine.
_ENV_ONLY = frozenset({"admin_token", "webhook_secret", "forward_secret"})


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting; pydantic converts and validates the values."""
    for name, field in Settings.model_fields.items():
        if name in _ENV_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:  # --x and --no-x: either beats the environment
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                help=f"{field.description} (default "
                                     f"{'on' if field.default else 'off'})")
        else:
            parser.add_argument(flag, dest=name, metavar=name.upper(),
                                help=f"{field.description} (default {field.default!r})")


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="sqlite+aiosqlite:///PATH or "
                                               "postgresql+asyncpg://USER@HOST/DB")


def settings_from(args: argparse.Namespace) -> Settings:
    names = set(Settings.model_fields)
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k in names and v is not None
    }
    return Settings(**overrides)


def parse(words: Sequence[str]) -> argparse.Namespace:
    """The command line parsed. A server command is parsed without loading the client side;
    anything that parser does not take is parsed again by the whole one, so that the error
    printed is the same either way."""
    if words[:1] and words[0] in SERVER_COMMANDS:
        args, unknown = build_parser(client_commands=False).parse_known_args(words)
        if not unknown:
            return args
    from replay.audit_cli import rewrite_argv  # noqa: PLC0415

    return build_parser().parse_args(rewrite_argv(words))


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = parse(words)
    if args.command in ("send", "tail"):
        from replay.commands import run as run_client_command  # noqa: PLC0415

        return run_client_command(args)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "settings"
            where = f"--{name.replace('_', '-')} / SIGNALBOX_{name.upper()}"
            print(f"signalbox: {where}: {error['msg']}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "audit":
            from replay.audit_cli import run as run_audit_command  # noqa: PLC0415

            return asyncio.run(run_audit_command(args, settings.database_url,
                                                 settings.claim_lease))
        if args.command == "rebuild":
            return asyncio.run(rebuild_command(args, settings))
        if args.command == "replay":
            from replay.history import run as run_history  # noqa: PLC0415

            return run_history(args, settings.database_url)
        if args.command == "migrate":
            from pipeline.migrate import head_revision  # noqa: PLC0415

            upgrade(settings.database_url, settings.commit_timeout)
            print(f"schema at revision {head_revision()}")
            return 0
        return asyncio.run(token_command(args, settings))
    except SignalboxError as exc:
        print(f"signalbox: {exc.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): nothing to blame, nothing more to say,
        # and nothing left to flush to it at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except DATABASE_ERRORS as exc:
        # Unreachable server, wrong credentials, no such database, missing tables: say so in
        # one line.
        cause = getattr(exc, "orig", None) or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        print(f"signalbox: the database at {redacted_url(settings.database_url)} failed: "
              f"{reason}. Check --database-url, and run `signalbox migrate` on a new database",
              file=sys.stderr)
        return 1


def serve(settings: Settings) -> int:
    from pipeline.processing.handlers import load_handler  # noqa: PLC0415
    from pipeline.serving import run_server, run_workers  # noqa: PLC0415

    if settings.handler:
        # Fail here with one line, before the database is touched, not from inside uvicorn's
        # lifespan (where the application loads it again).
        try:
            load_handler(settings.handler)
        except ValueError as exc:
            print(f"signalbox: --handler / SIGNALBOX_HANDLER: {exc}", file=sys.stderr)
            return 2
    if settings.migrate:
        upgrade(settings.database_url, settings.commit_timeout)
    # Fail here with one line, not with a traceback from inside uvicorn's lifespan.
    asyncio.run(_check_log(settings.database_url))
    return run_workers(settings) if settings.workers > 1 else run_server(settings)


def upgrade(url: str, wait: float) -> None:
    """Upgrade the schema, but never touch one newer than this code knows."""
    from pipeline import migrate  # noqa: PLC0415

    migrate.check_revision(asyncio.run(migrate.current_revision(url)), exact=False)
    migrate.upgrade(url, wait=wait)


async def _check_schema(url: str) -> None:
    """Raise (with a message that says what to do) unless the database is there, at our
    schema: a mistyped SQLite path is not created, a newer schema is not written to."""
    from pipeline import migrate  # noqa: PLC0415

    path = sqlite_path(url) if backend_kind(url) == "sqlite" else None
    if path is not None and not path.exists():
        raise SchemaMismatch(f"there is no database at {path}: check --database-url, or "
                             "create one with `signalbox migrate`")
    migrate.check_revision(await migrate.current_revision(url), exact=True)


async def _check_log(url: str) -> None:
    """Raise (with a message that says what to do) unless the log is there, at our schema."""
    await _check_schema(url)
    event_log = await EventLog.open(url)
    await event_log.close()


async def rebuild_command(args: argparse.Namespace, settings: Settings) -> int:
    """0 when the projection equals the log's fold (or was swapped), 1 when it differs."""
    from pipeline.processing.rebuild import rebuild  # noqa: PLC0415

    await _check_log(settings.database_url)

    def progress(report: RebuildReport) -> None:
        if sys.stderr.isatty() and report.events % 100_000 < 2000:
            print(f"folded {report.events:,} events", file=sys.stderr, flush=True)

    report = await rebuild(settings.database_url, swap=args.swap, progress=progress,
                           wait=settings.commit_timeout)
    if args.json:
        print(json.dumps(report.to_json(), default=str))
        return 0 if report.swapped or report.difference_count == 0 else 1
    print(f"rebuilt {report.signals:,} signals from {report.events:,} events "
          f"(up to position {report.head})")
    for problem in report.problems:
        print(f"problem  position {problem['position']} ({problem['type']}): "
              f"{problem['message']}")
    for difference in report.differences:
        if difference.kind == "differs":
            columns = "; ".join(f"{name}: live {json.dumps(v['live'], default=str)}, rebuilt "
                                f"{json.dumps(v['rebuilt'], default=str)}"
                                for name, v in difference.columns.items())
            print(f"differs  {difference.signal_id}  {columns}")
        elif difference.kind == "missing":
            print(f"missing  {difference.signal_id}  (in the log, not in the live table)")
        else:
            print(f"extra    {difference.signal_id}  (in the live table, not in the log)")
    shown = len(report.differences)
    if report.difference_count > shown:
        print(f"… and {report.difference_count - shown:,} more differences")
    verdict = ("the live projection equals the log" if report.difference_count == 0 else
               f"{report.difference_count:,} signals differ from the log")
    if report.moved_on:
        verdict += f" ({report.moved_on:,} changed while comparing, not compared)"
    print(verdict)
    if report.swapped:
        print(f"swapped: the live projection is now the rebuilt one (up to position "
              f"{report.head})")
        return 0
    return 0 if report.difference_count == 0 else 1


async def token_command(args: argparse.Namespace, settings: Settings) -> int:
    await _check_schema(settings.database_url)
    engines = create_engines(settings.database_url)
    store = TokenStore(engines.reader, cache_seconds=0)
    try:
        if args.token_command == "create":
            expires = args.expires
            if expires is not None and expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)
            secret = await store.create(args.name, args.scope, expires_at=expires)
            print(f"token {args.name!r} with scope(s) {', '.join(sorted(args.scope))}:")
            print(secret)
        elif args.token_command == "list":
            for info in await store.list():
                state = "revoked " + info.revoked_at if info.revoked_at else "active"
                expiry = f" expires {info.expires_at}" if info.expires_at else ""
                print(f"{info.name}\t{','.join(info.scopes)}\t{state}{expiry}")
        else:
            if not await store.revoke(args.name):
                print(f"signalbox: no active token named {args.name!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.name!r}")
        return 0
    finally:
        await engines.dispose()


if __name__ == "__main__":
    sys.exit(main())
