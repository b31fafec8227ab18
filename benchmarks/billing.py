"""Billing at scale: 10,000 accounts and 1,000,000 usage events invoiced for one month.

Run from the repository root:  python -m benchmarks.billing [--url URL]

Runs on a temporary SQLite catalog, or on the catalog at --url (for example a scratch PostgreSQL
database: it must be empty). The data is loaded by a separate process, so this process's peak
resident memory is the billing run's (plus the interpreter's). Prints the load time, the run's
wall time and peak memory, and the time of a re-run (which returns the stored invoices).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import tempfile
import time
from datetime import date, timedelta
from decimal import Decimal

from sqlalchemy import insert

from pipelines.billing.invoicing import run_billing
from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account, UsageEvent
from tests.test_billing_support import utc

ACCOUNTS = 10_000
EVENTS = 1_000_000


def _load(url: str, accounts_count: int, events: int) -> None:
    catalog = Catalog(url)
    catalog.migrate()
    rng = random.Random(5)
    plans = ["api"] * 4 + ["professional"] * 3 + ["professional_sharing"] * 2 + ["free"]
    accounts = [
        {
            "account_id": f"acct{n:05d}",
            "name": f"Customer {n}",
            "email": f"c{n}@example.com",
            "country": "DE",
            "plan": rng.choice(plans),
            "billing_cycle": "monthly",
            "started_at": date(2026, 1, 1) + timedelta(days=rng.randrange(300)),
            "tax_rate": Decimal("0.19"),
            "tax_exempt": n % 17 == 0,
        }
        for n in range(accounts_count)
    ]
    start = utc("2026-10-01T00:00Z")
    with catalog.session() as session:
        session.execute(insert(Account), accounts)
        for chunk in range(0, events, 100_000):
            session.execute(
                insert(UsageEvent),
                [
                    {
                        "event_id": f"ev{n:07d}",
                        "account_id": f"acct{rng.randrange(accounts_count):05d}",
                        "kind": "classification",
                        "occurred_at": start + timedelta(seconds=rng.randrange(31 * 86400)),
                        "points": rng.randrange(1, 5_000_000),
                        "status": rng.choice(("succeeded",) * 8 + ("failed", "aborted")),
                        "classifier": "grid",
                        "filename": "f.laz",
                    }
                    for n in range(chunk, min(chunk + 100_000, events))
                ],
            )
    catalog.dispose()


def run(url: str, accounts: int, events: int) -> None:
    started = time.perf_counter()
    loader = multiprocessing.get_context("spawn").Process(target=_load, args=(url, accounts, events))
    loader.start()
    loader.join()
    if loader.exitcode != 0:
        raise SystemExit(f"loading the data failed (exit code {loader.exitcode})")
    print(f"loaded {accounts:,} accounts and {events:,} events in {time.perf_counter() - started:.1f} s")

    catalog = Catalog(url)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    result = run_billing(catalog, "2026-10", load_pricebook(), now=utc("2026-11-01T02:00Z"))
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    lines = sum(len(i.lines) for i in result.invoices)
    # CPU time as well as wall time: on a shared machine the wall time says more about the neighbours.
    print(
        f"billing run 2026-10 ({catalog.engine.dialect.name}): {len(result.invoices):,} invoices, {lines:,} lines "
        f"in {elapsed:.1f} s ({cpu:.1f} s CPU in this process); peak resident memory {after.ru_maxrss / 1024:.0f} MiB "
        f"({before.ru_maxrss / 1024:.0f} MiB before the run)"
    )

    started = time.perf_counter()
    again = run_billing(catalog, "2026-10", load_pricebook(), now=utc("2026-11-01T02:00Z"))
    outcome = "nothing created" if not again.created else "CREATED INVOICES AGAIN"
    print(f"re-run (returns the stored invoices): {time.perf_counter() - started:.1f} s, {outcome}")
    catalog.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.billing", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an empty catalog database to load (default: a temporary SQLite file)")
    parser.add_argument("--accounts", type=int, default=ACCOUNTS, help=f"accounts (default {ACCOUNTS:,})")
    parser.add_argument("--events", type=int, default=EVENTS, help=f"usage events in the month (default {EVENTS:,})")
    args = parser.parse_args(argv)
    if args.url:
        run(args.url, args.accounts, args.events)
    else:
        with tempfile.TemporaryDirectory() as folder:
            run(f"sqlite:///{folder}/bench.db", args.accounts, args.events)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
