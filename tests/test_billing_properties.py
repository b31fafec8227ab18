"""Properties over many generated cases (hypothesis): totals add up, proration sums to the fee,
and the order or repetition of imports does not change the invoices."""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipelines.billing.drafting import draft_invoice  # noqa: E402
from pipelines.billing.imports import import_usage  # noqa: E402
from pipelines.billing.invoicing import run_billing  # noqa: E402
from pipelines.billing.ledger import Ledger  # noqa: E402
from pipelines.billing.lines import AccountFacts, UsageSlice, prorate  # noqa: E402
from pipelines.billing.periods import Period  # noqa: E402
from pipelines.catalog import Catalog  # noqa: E402
from tests.test_billing_support import add_account, check_einvoices, job, make_pricebook, utc  # noqa: E402

BOOK = make_pricebook(
    '\n  professional: {monthly_fee: "99.00", seat_fee: "10.00", extra_storage_fee_per_gb: "49.00"}'
    '\n  api: {monthly_fee: "0.00", price_per_million_points: "0.50", changes: [{effective_from: 2026-10-16, price_per_million_points: "0.55"}]}\n'
)
money = st.decimals(
    min_value=Decimal("0"), max_value=Decimal("100000"), places=2, allow_nan=False, allow_infinity=False
)
periods = st.builds(Period, st.integers(2024, 2030), st.integers(1, 12))


@st.composite
def accounts(draw):
    period = draw(periods)
    started = draw(st.dates(period.first_day - timedelta(days=400), period.last_day))
    ended = draw(st.none() | st.dates(started, period.last_day + timedelta(days=40)))
    return period, AccountFacts(
        account_id="a",
        country="DE",
        plan=draw(st.sampled_from(["free", "professional", "professional_sharing", "api"])),
        billing_cycle=draw(st.sampled_from(["monthly", "quarterly", "yearly"])),
        started_at=started,
        tax_rate=draw(st.decimals(min_value=Decimal("0"), max_value=Decimal("0.27"), places=3)),
        tax_exempt=draw(st.booleans()),
        seats=draw(st.integers(0, 50)),
        extra_storage_gb=draw(st.integers(0, 500)),
        ended_on=ended,
    )


@settings(max_examples=300, deadline=None)
@given(
    accounts(),
    st.integers(0, 10**10),
    st.fractions(min_value=0, max_value=100),
    money,
    money,
)
def test_total_is_the_sum_of_lines_plus_tax(account_case, points, availability, owed, paid):
    period, account = account_case
    usage = [UsageSlice(period.first_day, period.last_day, points)]
    ledger = Ledger(balance=owed - paid, not_yet_due=owed / 2)
    draft = draft_invoice(BOOK, period, account, usage, availability, ledger)
    if draft is None:
        return
    assert draft.subtotal == sum(line.amount for line in draft.lines)
    assert draft.total == draft.subtotal + draft.tax
    assert draft.taxable_subtotal == sum(line.amount for line in draft.lines if line.taxable)
    assert all(line.amount == line.amount.quantize(Decimal("0.01")) for line in draft.lines)
    assert draft.tax == (
        Decimal(0)
        if account.tax_exempt
        else (draft.taxable_subtotal * account.tax_rate).quantize(Decimal("0.01"), "ROUND_HALF_UP")
    )
    assert draft.credit_applied <= ledger.credit


@given(money, periods, st.data())
def test_proration_over_a_month_sums_to_the_fee(fee, period, data):
    assert prorate(fee, period.days, period.days) == fee
    # Split the month at any day: the exact shares add up to the fee, the rounded ones within a cent.
    split = data.draw(st.integers(1, period.days - 1))
    exact = Fraction(fee) * split / period.days + Fraction(fee) * (period.days - split) / period.days
    assert exact == Fraction(fee)
    assert abs(prorate(fee, split, period.days) + prorate(fee, period.days - split, period.days) - fee) <= Decimal(
        "0.01"
    )
    # Every day of the month is charged exactly once: day-by-day exact shares sum to the fee.
    assert sum(Fraction(fee) * 1 / period.days for _ in range(period.days)) == Fraction(fee)


events = st.lists(
    st.tuples(
        st.sampled_from(["a1", "a2", "a3"]),
        st.datetimes(
            min_value=utc("2026-09-28T00:00Z").replace(tzinfo=None),
            max_value=utc("2026-11-02T00:00Z").replace(tzinfo=None),
        ),
        st.integers(0, 10**9),
        st.sampled_from(["succeeded", "failed", "aborted"]),
    ),
    min_size=1,
    max_size=25,
)


def _fresh_catalog(template: Path, directory: Path) -> Catalog:
    path = directory / "catalog.db"
    shutil.copy(template, path)
    return Catalog(f"sqlite:///{path}")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("props") / "template.db"
    catalog = Catalog(f"sqlite:///{path}")
    catalog.migrate()
    for account_id in ("a1", "a2", "a3"):
        add_account(catalog, account_id, plan="api")
    catalog.dispose()
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events, st.randoms(use_true_random=False))
def test_importing_in_any_order_or_twice_gives_the_same_invoices(template, generated, rng):
    records = [
        job(f"e{n}", account, when.isoformat() + "Z", points, status)
        for n, (account, when, points, status) in enumerate(generated)
    ]
    shuffled = records + records[: len(records) // 2]
    rng.shuffle(shuffled)
    results = []
    for batches in ([records], [shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :], records]):
        with tempfile.TemporaryDirectory() as directory:
            catalog = _fresh_catalog(template, Path(directory))
            for batch in batches:
                import_usage(catalog, list(enumerate(batch, start=1)))
            results.append(
                [i.to_dict() for i in run_billing(catalog, "2026-10", BOOK, now=utc("2027-01-01T00:00Z")).invoices]
            )
            catalog.dispose()
    assert results[0] == results[1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events)
def test_every_generated_invoice_is_a_valid_e_invoice(template, generated):
    records = [
        job(f"e{n}", account, when.isoformat() + "Z", points, status)
        for n, (account, when, points, status) in enumerate(generated)
    ]
    with tempfile.TemporaryDirectory() as directory:
        catalog = _fresh_catalog(template, Path(directory))
        import_usage(catalog, list(enumerate(records, start=1)))
        invoices = run_billing(catalog, "2026-10", BOOK, now=utc("2027-01-01T00:00Z")).invoices
        assert check_einvoices(catalog) == len(invoices)  # each CII XML validates against the Factur-X EN 16931 schema
        catalog.dispose()
