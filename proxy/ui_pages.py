"""The dashboard's HTML: server-rendered pages and inline SVG charts, no script at all. Every
value from the ledger or the policy files is escaped here, once, by `h`."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:center}
header h1{font-size:18px;margin:0;flex:1}header form{margin:0}
main{max-width:1180px;margin:0 auto;padding:8px 24px 48px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:16px 0;padding:8px 20px 16px}
h2{font-size:16px;margin:10px 0}h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e5e8ec;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.n{text-align:right}
.fail{color:#b42318;font-weight:600}.pass{color:#1a7f37}.muted{color:#667085}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}
.login{max-width:420px;margin:80px auto;background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:24px}
.login input{width:100%;box-sizing:border-box;padding:8px;margin:8px 0 12px;font:inherit}
.error{background:#fef3f2;border:1px solid #fda29b;padding:8px 12px;border-radius:4px}
button{font:inherit;padding:6px 14px;cursor:pointer}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
svg text{font:11px system-ui,sans-serif;fill:#344054}
"""
# The one style block's hash, so the page's policy can refuse every other style and all script.
STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
PALETTE = ("#2e6fdb", "#e8702a", "#1a9c6b", "#b83280", "#7a5af8", "#c9a227", "#0e9384",
           "#d92d20", "#475467", "#93a0b4")


def h(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, *, signed_in: bool = False) -> str:
    logout = ('<form method="post" action="/ui/logout"><button type="submit">Sign out</button>'
              "</form>") if signed_in else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{h(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>euroute: {h(title)}</h1>{logout}</header><main>{body}</main>"
            "</body></html>")


def login(message: str | None = None) -> str:
    error = f'<p class="error" role="alert">{h(message)}</p>' if message else ""
    return page("auditor sign-in", f"""<form class="login" method="post" action="/ui/login"
autocomplete="off"><h2>Audit dashboard</h2>
<p>Sign in with an <b>auditor</b> key (<code>euroute keys create --role auditor</code>).
App and admin keys cannot open the dashboard.</p>{error}
<label for="key">Auditor key</label>
<input id="key" name="key" type="password" required maxlength="200" autofocus>
<button type="submit">Sign in</button></form>""")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
          numeric: Iterable[str] = ()) -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    columns = list(columns or rows[0])
    right = set(numeric)
    head = "".join(f"<th>{h(c.replace('_', ' '))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(_cell(row.get(c), c in right) for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any, numeric: bool) -> str:
    if isinstance(value, dt.datetime):
        value = value.strftime("%Y-%m-%d %H:%M")
    elif isinstance(value, Decimal):
        value = format(value, "f")
    if value == "FAIL":
        return '<td class="fail">FAIL</td>'
    if value == "pass":
        return '<td class="pass">pass</td>'
    return f'<td class="n">{h(value)}</td>' if numeric else f"<td>{h(value)}</td>"


def line_chart(label: str, days: Sequence[str], series: Mapping[str, Sequence[Decimal]],
               unit: str) -> str:
    """Spend per day, one line per series, with a legend; `label` names the chart for screen
    readers."""
    if not series or not days:
        return '<p class="muted">(no spend in this period)</p>'
    width, height, left, top, bottom = 860, 240, 70, 12, 28
    plot_w, plot_h = width - left - 190, height - top - bottom
    peak = max((v for values in series.values() for v in values), default=Decimal(0))
    peak = peak if peak > 0 else Decimal(1)
    step = plot_w / max(len(days) - 1, 1)

    def y(v: Decimal) -> float:
        return top + plot_h - float(v / peak) * plot_h

    parts = [f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
             'stroke="#98a2b3"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#98a2b3"/>']
    for fraction in (0, 0.5, 1):
        value = peak * Decimal(fraction)
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f"{h(_money(value))}</text>")
    for i in sorted({0, len(days) // 2, len(days) - 1}):
        parts.append(f'<text x="{left + i * step:.1f}" y="{height - 8}" text-anchor="middle">'
                     f"{h(days[i])}</text>")
    for n, (name, values) in enumerate(series.items()):
        color = PALETTE[n % len(PALETTE)]
        points = " ".join(f"{left + i * step:.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}">'
                     f"<title>{h(name)}: {h(_money(sum(values, Decimal(0))))} {h(unit)}</title>"
                     "</polyline>")
        ly = top + 6 + n * 18
        parts.append(f'<rect x="{left + plot_w + 16}" y="{ly - 8}" width="12" height="12" '
                     f'fill="{color}"/><text x="{left + plot_w + 34}" y="{ly + 2}">{h(name)}'
                     "</text>")
    return (f'<svg role="img" aria-label="{h(label)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f"<title>{h(label)} ({h(unit)})</title>{''.join(parts)}</svg>")


def bar_chart(label: str, bars: Sequence[tuple[str, int]]) -> str:
    """Horizontal bars with their counts."""
    if not bars:
        return '<p class="muted">(none)</p>'
    width, row, left = 860, 22, 260
    peak = max(v for _, v in bars) or 1
    parts = []
    for i, (name, value) in enumerate(bars):
        y = i * row
        length = (width - left - 80) * value / peak
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{h(name)}</text>'
                     f'<rect x="{left}" y="{y + 4}" width="{length:.1f}" height="14" '
                     f'fill="{PALETTE[0]}"/><text x="{left + length + 6:.1f}" y="{y + 15}">'
                     f"{value}</text>")
    height = row * len(bars) + 4
    return (f'<svg role="img" aria-label="{h(label)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f"<title>{h(label)}</title>{''.join(parts)}</svg>")


def _money(value: Decimal) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"
