"""E-mail addresses: one strict syntax for every address pointflow stores or writes into a header.

A plain addr-spec (`name@domain.example`): a dot-atom local part and a domain of DNS labels, ASCII
only, at most 254 characters. No display names, comments or quoting, and so no spaces, line breaks
or other control characters: an address is never a way to add a header (`x@e.example\\nBcc: …`).
"""

from __future__ import annotations

import re
from email.utils import formataddr, parseaddr

from pipelines.errors import UserError

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
MAX_LENGTH = 254


class InvalidAddress(UserError, ValueError):
    """Not one plain e-mail address; the message quotes it escaped, on one line."""


def check_address(address: str) -> str:
    if not isinstance(address, str) or len(address) > MAX_LENGTH or not ADDRESS.fullmatch(address):
        raise InvalidAddress(
            f"e-mail address {address!r} is not one plain address (name@domain.example: "
            "no display name, spaces, line breaks or other control characters)"
        )
    return address


def check_mailbox(value: str) -> str:
    """A From: header value: an address, with or without a display name ("Acme <ops@acme.example>")."""
    name, address = parseaddr(value)
    check_address(address)
    control = any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    if control or value.strip() not in (address, formataddr((name, address))):
        raise InvalidAddress(
            f"sender {value!r} is not one address with an optional display name, e.g. 'Acme LiDAR <lidar@acme.example>'"
        )
    return value
