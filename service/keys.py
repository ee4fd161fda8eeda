"""Manage API keys: ``python -m service.keys create --tenant acme --role member``.

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
from service.models import ROLES
from shortened.config import Settings


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.keys", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", choices=ROLES, default="member")
    create.add_argument("--name", help="a label, e.g. who or what uses the key")
    listing = commands.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant")
    revoke = commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)

    settings = settings or Settings()
    if is_sqlite(settings.resolved_database_url):
        upgrade_database(settings)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            if args.command == "create":
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
            elif args.command == "list":
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


if __name__ == "__main__":
    sys.exit(main())
