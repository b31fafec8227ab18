"""Exact money arithmetic: intermediate values are Fractions, results are Decimals rounded half-up."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

CENT_PLACES = 2


def round_half_up(value: Fraction | Decimal | int, places: int = CENT_PLACES) -> Decimal:
    """Round exactly (no float, no context precision) to `places` decimals, halves away from zero."""
    scaled = Fraction(value) * 10**places
    whole, remainder = divmod(abs(scaled.numerator), scaled.denominator)
    if 2 * remainder >= scaled.denominator:
        whole += 1
    sign = -1 if scaled < 0 else 1
    return Decimal(sign * whole).scaleb(-places)


def format_money(value: Decimal) -> str:
    """Two decimals, as the JSON and documents show money: "51.10"."""
    return f"{value.quantize(Decimal('0.01')):f}"


def format_rate(value: Decimal) -> str:
    """A price or rate: at least two decimals, more only when the price book has them ("0.015")."""
    text = f"{value.normalize():f}"
    if "." not in text:
        return f"{text}.00"
    decimals = len(text.split(".")[1])
    return text + "0" * (CENT_PLACES - decimals) if decimals < CENT_PLACES else text


def format_quantity(value: Decimal) -> str:
    """Without trailing zeros: "1", "0.5484", "12.345678"."""
    return f"{value.normalize():f}" if value else "0"
