"""Manage API keys: ``shortened keys create --tenant acme --role member`` (or ``python -m
service.keys create ...``).

``create`` prints the new key once (only its sha256 is stored); ``list`` shows ids, tenants
and roles, never keys; ``revoke ID`` disables a key at once for the API processes sharing this
data_dir (elsewhere within ``service.auth.KEY_CACHE_TTL_S``). Uses the settings' database
(SHORTENED_DATABASE_URL); the embedded SQLite store is migrated first, as the API does.
"""

from __future__ import annotations

import argparse
import sys

from service.auth import create_api_key, list_api_keys, mark_keys_revoked, revoke_api_key
from service.db import is_sqlite, make_engine, make_sessionmaker, upgrade_database
from shortened.config import Settings


def manage_keys(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Run ``create``, ``list`` or ``revoke`` (``args.action``; the options are declared by
    ``service.commands``); the exit status."""
    settings = settings or Settings()
    if is_sqlite(settings.resolved_database_url):
        upgrade_database(settings)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            if args.action == "create":
                try:
                    row, key = create_api_key(session, args.tenant, args.role, args.name)
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                print(
                    f"created key {row.id} for tenant {row.tenant!r} (role {row.role}); "
                    "store it now, it is not shown again:",
                    file=sys.stderr,
                )
                print(key)
            elif args.action == "list":
                for row in list_api_keys(session, args.tenant):
                    state = "revoked" if row.revoked_at else "active"
                    print(f"{row.id}\t{row.tenant}\t{row.role}\t{state}\t{row.name or ''}")
            else:
                if not revoke_api_key(session, args.key_id):
                    print(f"error: no active key {args.key_id}", file=sys.stderr)
                    return 1
                # The API processes of this host drop their cached keys at once (others
                # within KEY_CACHE_TTL_S).
                mark_keys_revoked(settings.data_dir)
                print(f"revoked {args.key_id}", file=sys.stderr)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":  # the same as ``shortened keys``
    from shortened.cli.service_commands import start_service_command

    start_service_command("keys")
