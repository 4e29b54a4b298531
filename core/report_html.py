"""The backtest report: ``equity.csv``, ``equity.png`` and a self-contained ``report.html``.

The page compares several runs of the same days (the first is the main one, e.g. "strategy",
then baselines such as "rules only" or "random entries"): a stats table side by side, equity
and drawdown, daily P/L, P/L by strategy and by exit reason, the trade P/L distribution. Plots
are PNGs drawn with matplotlib's Agg canvas (no pyplot, no display) and embedded as base64
data URIs: the page loads no external resource and needs no JavaScript.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from core.analytics import (
    DEFAULT_STARTING_CASH_CENTS,
    NY,
    SESSION_OPEN,
    RunResult,
    daily_pnl,
    equity_curve,
    pnl_histogram,
    stats,
)

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
DPI = 100


class ReportPaths(NamedTuple):
    """The files :func:`write_report` wrote."""

    html: Path
    equity_csv: Path
    equity_png: Path


# --- formatting ------------------------------------------------------------------------------

def _money(v: float | None) -> str:
    if v is None:
        return "—"
    return f"-${-v:,.2f}" if v < 0 else f"${v:,.2f}"


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v * 100:.{digits}f}%"


def _num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _int(v: int | None) -> str:
    return "—" if v is None else f"{v:,d}"


STAT_ROWS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("Days", "days", _int),
    ("Trades", "trades", _int),
    ("Long / short", "", str),  # filled in specially
    ("Net P/L", "net_pnl", _money),
    ("Gross P/L", "gross_pnl", _money),
    ("Fees", "fees", _money),
    ("Return on starting cash", "return", lambda v: _pct(v, 3)),
    ("Ending equity", "ending_equity", _money),
    ("Win rate", "win_rate", _pct),
    ("Profit factor", "profit_factor", _num),
    ("Average win", "avg_win", _money),
    ("Average loss", "avg_loss", _money),
    ("Average trade", "avg_trade", _money),
    ("Best trade", "best_trade", _money),
    ("Worst trade", "worst_trade", _money),
    ("Sharpe (daily, annualised)", "sharpe_daily", _num),
    ("Max drawdown", "max_drawdown", _money),
    ("Max drawdown (of starting cash)", "max_drawdown_pct", lambda v: _pct(v, 3)),
    ("Exposure (session time in a position)", "exposure", _pct),
    ("Capital used / daily limit (mean)", "capital_used_mean", _pct),
    ("Capital used / daily limit (max)", "capital_used_max", _pct),
    ("Daily limit", "daily_limit", _money),
)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


# --- plots -----------------------------------------------------------------------------------

def _figure(height: float, rows: int = 1, cols: int = 1,
            ratios: Sequence[float] | None = None, bottom: float = 0.14) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # fixed margins (inches) instead of a layout engine: a third of the rendering time
    fig = Figure(figsize=(10, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.85 / 10, right=0.985, top=1 - 0.35 / height,
                        bottom=bottom, hspace=0.12, wspace=0.22)
    axes = fig.subplots(rows, cols, sharex=rows > 1,
                        gridspec_kw={"height_ratios": list(ratios)} if ratios else None)
    return fig, axes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _local(t: str) -> dt.datetime:
    """An ISO time as naive New York wall time (for the plots' axes)."""
    x = dt.datetime.fromisoformat(t)
    return (x.astimezone(NY) if x.tzinfo else x).replace(tzinfo=None)


def _first_open(run: RunResult) -> dt.datetime | None:
    dates = [str(d["date"]) for d in run.day_stats] + [str(t["date"]) for t in run.trades]
    if not dates:
        return None
    return dt.datetime.combine(dt.date.fromisoformat(min(dates)), SESSION_OPEN)


def _equity_png(curves: Mapping[str, list[tuple[str, int, int]]], runs: Mapping[str, RunResult],
                starting_cash_cents: int) -> bytes:
    fig, (ax_eq, ax_dd) = _figure(5.5, 2, 1, (3, 1), bottom=0.55 / 5.5)
    for i, (name, curve) in enumerate(curves.items()):
        xs = [_local(t) for t, _, _ in curve]
        eq = [e / 100 for _, e, _ in curve]
        dd = [-d / 100 for _, _, d in curve]
        start = _first_open(runs[name])
        if start is not None and (not xs or start < xs[0]):
            xs, eq, dd = [start, *xs], [starting_cash_cents / 100, *eq], [0.0, *dd]
        style = {"color": COLORS[i % len(COLORS)], "lw": 1.8 if i == 0 else 1.1,
                 "alpha": 1.0 if i == 0 else 0.85, "drawstyle": "steps-post"}
        ax_eq.plot(xs, eq, label=name, **style)
        ax_dd.plot(xs, dd, **style)
    ax_eq.axhline(starting_cash_cents / 100, color="grey", lw=0.8, ls="--")
    ax_eq.set_ylabel("equity ($)")
    ax_eq.set_title("Equity (closed trades, New York time)")
    ax_eq.legend(loc="best", fontsize=8)
    ax_eq.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax_dd.set_ylabel("drawdown ($)")
    for ax in (ax_eq, ax_dd):
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _png(fig)


def _grouped_bars(ax: Any, labels: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(labels))]
        ax.bar(xs, values, width=width, label=name, color=COLORS[i % len(COLORS)])
    ax.set_xticks(range(len(labels)))
    rotate = len(labels) > 8
    ax.set_xticklabels(labels, rotation=60 if rotate else 0, ha="right" if rotate else "center",
                       fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)


def _daily_png(daily: Mapping[str, list[tuple[str, int]]]) -> bytes:
    dates = sorted({d for rows in daily.values() for d, _ in rows})
    series = {name: [dict(rows).get(d, 0) / 100 for d in dates] for name, rows in daily.items()}
    fig, ax = _figure(3.8, bottom=(1.0 if len(dates) > 8 else 0.5) / 3.8)
    _grouped_bars(ax, dates, series)
    ax.set_ylabel("net P/L ($)")
    ax.set_title("Daily net P/L")
    return _png(fig)


def _breakdown_png(all_stats: Mapping[str, dict[str, Any]]) -> bytes:
    many = max((len({k for s in all_stats.values() for k in s[key]})
                for key in ("by_strategy", "by_exit_reason")), default=0) > 8
    fig, axes = _figure(3.8, 1, 2, bottom=(1.0 if many else 0.5) / 3.8)
    for ax, key, title in ((axes[0], "by_strategy", "Net P/L by strategy"),
                           (axes[1], "by_exit_reason", "Net P/L by exit reason")):
        labels = sorted({k for s in all_stats.values() for k in s[key]})
        series = {name: [s[key].get(k, {}).get("net_pnl", 0.0) for k in labels]
                  for name, s in all_stats.items()}
        _grouped_bars(ax, labels, series)
        ax.set_title(title)
        ax.set_ylabel("net P/L ($)")
    return _png(fig)


def _histogram_png(runs: Mapping[str, RunResult]) -> bytes:
    values = {name: [int(t["pnl_cents"]) for t in r.trades] for name, r in runs.items()}
    edges, _ = pnl_histogram([v for vs in values.values() for v in vs], max_bins=40)
    fig, ax = _figure(3.8, bottom=0.55 / 3.8)
    if edges:
        bins = [e / 100 for e in edges]
        for i, (name, vs) in enumerate(values.items()):
            if not vs:
                continue
            color = COLORS[i % len(COLORS)]
            if i == 0:
                ax.hist([v / 100 for v in vs], bins=bins, color=color, alpha=0.6, label=name)
            else:
                ax.hist([v / 100 for v in vs], bins=bins, color=color, histtype="step", lw=1.5,
                        label=name)
        ax.axvline(0, color="black", lw=0.8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trades", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("net P/L per trade ($)")
    ax.set_ylabel("trades")
    ax.set_title("Trade P/L distribution")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


# --- page ------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 24px auto; max-width: 1100px; color: #222; padding: 0 12px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.main, td.main { background: #eef5fc; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.note { color: #666; font-size: 0.88em; }
"""


def _img(png: bytes, alt: str, id_: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{_e(id_)}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _stats_table(all_stats: Mapping[str, dict[str, Any]]) -> str:
    names = list(all_stats)
    head = "".join(f'<th class="{"main" if i == 0 else ""}">{_e(n)}</th>'
                   for i, n in enumerate(names))
    rows = []
    for label, key, fmt in STAT_ROWS:
        cells = []
        for i, n in enumerate(names):
            s = all_stats[n]
            text = (f"{s['long_trades']:,d} / {s['short_trades']:,d}" if label == "Long / short"
                    else fmt(s[key]))
            cells.append(f'<td class="num{" main" if i == 0 else ""}">{_e(text)}</td>')
        rows.append(f"<tr><th>{_e(label)}</th>{''.join(cells)}</tr>")
    return (f'<table id="stats"><thead><tr><th>Statistic</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _breakdown_table(all_stats: Mapping[str, dict[str, Any]], key: str, title: str,
                     id_: str) -> str:
    names = list(all_stats)
    labels = sorted({k for s in all_stats.values() for k in s[key]})
    head = "".join(f'<th colspan="3">{_e(n)}</th>' for n in names)
    sub = "<th>trades</th><th>net P/L</th><th>win rate</th>" * len(names)
    rows = []
    for k in labels:
        cells = []
        for n in names:
            g = all_stats[n][key].get(k)
            vals = ((_int(g["trades"]), _money(g["net_pnl"]), _pct(g["win_rate"])) if g
                    else ("0", "—", "—"))
            cells.extend(f'<td class="num">{_e(v)}</td>' for v in vals)
        rows.append(f"<tr><th>{_e(k)}</th>{''.join(cells)}</tr>")
    if not labels:
        rows.append(f'<tr><td colspan="{1 + 3 * len(names)}">no trades</td></tr>')
    return (f'<table id="{_e(id_)}"><thead><tr><th rowspan="2">{_e(title)}</th>{head}</tr>'
            f"<tr>{sub}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _write_equity_csv(path: Path, curves: Mapping[str, list[tuple[str, int, int]]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("run", "time", "equity", "drawdown"))
        for name, curve in curves.items():
            for t, eq, dd in curve:
                w.writerow((name, t, f"{eq / 100:.2f}", f"{dd / 100:.2f}"))


def write_report(out_dir: Path | str, runs: Mapping[str, RunResult],
                 starting_cash_cents: int = DEFAULT_STARTING_CASH_CENTS,
                 title: str = "Backtest report") -> ReportPaths:
    """Write ``equity.csv``, ``equity.png`` and ``report.html`` into ``out_dir``.

    ``runs`` maps a run name to its :class:`RunResult`; the first run is the main one.
    Returns the paths written.
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = dict(runs)
    all_stats = {n: stats(r.trades, r.day_stats, r.daily_limit_cents, starting_cash_cents)
                 for n, r in runs.items()}
    curves = {n: equity_curve(r.trades, starting_cash_cents) for n, r in runs.items()}
    daily = {n: daily_pnl(r.trades, r.day_stats) for n, r in runs.items()}

    csv_path = out / "equity.csv"
    _write_equity_csv(csv_path, curves)
    from core.forking import fork_pool

    with fork_pool(1) as pool:  # half the figures on a second core
        later = [pool.submit(_daily_png, daily), pool.submit(_breakdown_png, all_stats)]
        equity_png = _equity_png(curves, runs, starting_cash_cents)
        histogram_png = _histogram_png(runs)
        daily_png, breakdown_png = (f.result() for f in later)
    png_path = out / "equity.png"
    png_path.write_bytes(equity_png)

    main = next(iter(runs))
    dates = sorted({d for rows in daily.values() for d, _ in rows})
    period = f"{dates[0]} … {dates[-1]}" if dates else "no sessions"
    names = ", ".join(runs)
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Main run: <b>{_e(main)}</b>. Runs compared: {_e(names)}. '
        f"Sessions: {_e(period)} ({len(dates)} day(s)). Starting cash "
        f"{_e(_money(starting_cash_cents / 100))}. Money in US dollars, times New York.</p>",
        "<h2>Statistics</h2>",
        _stats_table(all_stats),
        '<p class="note">Sharpe: mean / sample standard deviation of daily net P/L (days '
        "without trades count as zero) x √252. Drawdown: on the equity of closed trades in "
        "exit order. Exposure: share of session minutes (09:30 to the close) with at least "
        "one open position. Profit factor: gross wins / gross losses of net P/L.</p>",
        "<h2>Equity and drawdown</h2>",
        _img(equity_png, "equity and drawdown of each run", "equity-plot"),
        "<h2>Daily P/L</h2>",
        _img(daily_png, "daily net P/L of each run", "daily-plot"),
        "<h2>P/L by strategy and by exit reason</h2>",
        _img(breakdown_png, "net P/L by strategy and by exit reason",
             "breakdown-plot"),
        _breakdown_table(all_stats, "by_strategy", "Strategy", "by-strategy"),
        _breakdown_table(all_stats, "by_exit_reason", "Exit reason", "by-exit-reason"),
        "<h2>Trade P/L distribution</h2>",
        _img(histogram_png, "histogram of net P/L per trade", "histogram-plot"),
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}: {_e(main)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return ReportPaths(html_path, csv_path, png_path)
