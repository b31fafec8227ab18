"""The operators' page's usage chart: billable points per month, stacked by account, as inline SVG."""

from __future__ import annotations

import io
import threading

from pipelines.dashboard import Dashboard

# Stacked bars, one colour per account, in a fixed order so a month's stack reads the same way.
# matplotlib's rcParams are process-wide and the web server renders charts from several threads.
_CHART_LOCK = threading.Lock()
ACCOUNT_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def usage_chart_svg(dashboard: Dashboard) -> str:
    """Billable points per month, one stacked bar segment per account, as an inline SVG element.

    Each segment carries the id `usage-<account>-<YYYY-MM>`, so the page (and its test) can tell
    which bar is which.
    """
    import matplotlib
    from matplotlib.figure import Figure

    accounts = sorted({u.account_id for u in dashboard.usage})
    by_key = {(u.account_id, u.period): u.billable_points for u in dashboard.usage}
    months = list(dashboard.months)
    with _CHART_LOCK, matplotlib.rc_context({"svg.fonttype": "none", "font.size": 10, "svg.hashsalt": "pointflow"}):
        figure = Figure(figsize=(10, 3.6), dpi=96)
        axes = figure.subplots()
        bottom = [0.0] * len(months)
        for index, account_id in enumerate(accounts):
            values = [by_key.get((account_id, m), 0) / 1e6 for m in months]
            bars = axes.bar(
                months,
                values,
                bottom=bottom,
                label=account_id,
                color=ACCOUNT_COLOURS[index % len(ACCOUNT_COLOURS)],
                width=0.6,
            )
            for bar, month, value in zip(bars, months, values, strict=True):
                if value:
                    bar.set_gid(f"usage-{account_id}-{month}")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for month, total in zip(months, bottom, strict=True):
            if total:
                axes.annotate(
                    f"{total:,.2f} M",
                    (month, total),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=9,
                    color="#333333",
                )
        axes.set_ylabel("billable points (millions)")
        axes.margins(y=0.12)
        axes.set_title("Classification usage per month (UTC)", loc="left")
        axes.spines[["top", "right"]].set_visible(False)
        axes.grid(axis="y", color="#dddddd", linewidth=0.8)
        axes.set_axisbelow(True)
        if accounts:
            axes.legend(title="account", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        else:
            axes.text(
                0.5, 0.5, "no usage recorded in these months", transform=axes.transAxes, ha="center", color="#777777"
            )
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]
