"""Customer-facing text: every page and e-mail a customer reads is a Jinja2 template in
`pipelines/templates/` (shipped as package data), rendered here.

Pages (`*.html.j2`) are autoescaped: a file or account name is text, never markup. E-mails
(`mail/*.txt.j2`) are plain text, not escaped; each sets `subject` with `{% set subject %}` and
its body is the rest. The subject becomes a header, so it is kept to one line whatever the values
hold (a name with a line break cannot add a header), without leading, trailing or doubled spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from pipelines.billing.money import format_money

TEMPLATES = "templates"
PAGE_SUFFIX = ".html.j2"
MAIL_SUFFIX = ".txt.j2"


@dataclass(frozen=True)
class Attachment:
    """A file sent with an e-mail (an invoice's PDF, its e-invoice XML)."""

    filename: str
    content_type: str  # "application/pdf"
    data: bytes


@dataclass(frozen=True)
class Mail:
    subject: str
    body: str
    attachments: tuple[Attachment, ...] = ()


@cache
def environment(mail: bool) -> Environment:
    """Pages autoescaped; mails plain text, ending with the newline their template ends with."""
    env = Environment(
        loader=PackageLoader("pipelines", TEMPLATES),
        autoescape=not mail,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=mail,
    )
    # `value | fmt(">12,")` is Python's format(value, ">12,"): columns, numbers and dates as in an f-string.
    env.filters["fmt"] = format
    env.filters["money"] = format_money
    # Where customers reach support (notify.support_address); mails given none say how without one.
    env.globals["support"] = None
    return env


def render_page(template: str, /, **values: Any) -> str:
    if not template.endswith(PAGE_SUFFIX):
        raise ValueError(f"{template} is not a page template (*{PAGE_SUFFIX})")
    return environment(mail=False).get_template(template).render(**values)


def render_mail(template: str, /, **values: Any) -> Mail:
    if not template.endswith(MAIL_SUFFIX):
        raise ValueError(f"{template} is not a mail template (*{MAIL_SUFFIX})")
    module = environment(mail=True).get_template(template).make_module(values)
    return Mail(" ".join(str(module.subject).split()), str(module))
