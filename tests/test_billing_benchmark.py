"""Benchmark: 10,000 accounts and 1,000,000 usage events invoiced for one month.

Opt-in (it takes about a minute to load the data): POINTFLOW_BENCHMARK=1 pytest -s tests/test_billing_benchmark.py
Runs on a temporary SQLite catalog, or on POINTFLOW_BENCHMARK_URL (for example a scratch
PostgreSQL database). The data is loaded by a separate process, so this process's peak resident
memory is the billing run's (plus the interpreter's). Prints wall time and peak memory.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import resource
import time
from datetime import date, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import insert

from pipelines.billing.invoicing import run_billing
from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog import Catalog
from pipelines.catalog.models import Account, UsageEvent
from tests.test_billing_support import utc

ACCOUNTS = 10_000
EVENTS = 1_000_000
TARGET_SECONDS = 60

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("POINTFLOW_BENCHMARK") != "1", reason="set POINTFLOW_BENCHMARK=1 to run the benchmark"),
]


def _load(url: str) -> None:
    catalog = Catalog(url)
    catalog.migrate()
    rng = random.Random(5)
    plans = ["api"] * 4 + ["professional"] * 3 + ["professional_sharing"] * 2 + ["free"]
    accounts = [
        {
            "account_id": f"acct{n:05d}", "name": f"Customer {n}", "email": f"c{n}@example.com", "country": "DE",
            "plan": rng.choice(plans), "billing_cycle": "monthly", "started_at": date(2026, 1, 1) + timedelta(days=rng.randrange(300)),
            "tax_rate": Decimal("0.19"), "tax_exempt": n % 17 == 0,
        }  # fmt: skip
        for n in range(ACCOUNTS)
    ]
    start = utc("2026-10-01T00:00Z")
    with catalog.session() as session:
        session.execute(insert(Account), accounts)
        for chunk in range(0, EVENTS, 100_000):
            session.execute(
                insert(UsageEvent),
                [
                    {
                        "event_id": f"ev{n:07d}", "account_id": f"acct{rng.randrange(ACCOUNTS):05d}", "kind": "classification",
                        "occurred_at": start + timedelta(seconds=rng.randrange(31 * 86400)), "points": rng.randrange(1, 5_000_000),
                        "status": rng.choice(("succeeded",) * 8 + ("failed", "aborted")), "classifier": "grid", "filename": "f.laz",
                    }  # fmt: skip
                    for n in range(chunk, chunk + 100_000)
                ],
            )
    catalog.dispose()


def test_invoice_10000_accounts_and_a_million_events(tmp_path):
    url = os.environ.get("POINTFLOW_BENCHMARK_URL") or f"sqlite:///{tmp_path / 'bench.db'}"
    started = time.perf_counter()
    loader = multiprocessing.get_context("spawn").Process(target=_load, args=(url,))
    loader.start()
    loader.join()
    assert loader.exitcode == 0
    print(f"\nloaded {ACCOUNTS:,} accounts and {EVENTS:,} events in {time.perf_counter() - started:.1f} s")

    catalog = Catalog(url)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = run_billing(catalog, "2026-10", load_pricebook(), now=utc("2026-11-01T02:00Z"))
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    lines = sum(len(i.lines) for i in result.invoices)
    print(f"billing run 2026-10 ({catalog.engine.dialect.name}): {len(result.invoices):,} invoices, {lines:,} lines "
          f"in {elapsed:.1f} s; peak resident memory {peak / 1024:.0f} MiB ({before / 1024:.0f} MiB before the run)")  # fmt: skip

    started = time.perf_counter()
    again = run_billing(catalog, "2026-10", load_pricebook(), now=utc("2026-11-01T02:00Z"))
    print(f"re-run (returns the stored invoices): {time.perf_counter() - started:.1f} s")
    catalog.dispose()
    assert result.created and not again.created and len(again.invoices) == len(result.invoices)
    assert elapsed < TARGET_SECONDS
