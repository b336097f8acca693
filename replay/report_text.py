"""The audit report (the JSON of ``GET /api/audit/report``) for people."""

from __future__ import annotations

from typing import Any

from replay.timeline import human


def _counts(values: dict[str, int]) -> str:
    shown = [f"{name} {count:,}" for name, count in values.items() if count]
    return ", ".join(shown) or "none"


def _span(seconds: float | None) -> str:
    return "-" if seconds is None else human(seconds)


def render_report(report: dict[str, Any]) -> str:
    rejections, duplicates, stuck = report["rejections"], report["duplicates"], report["stuck"]
    lines = [
        f"signals received from {report['since']} to {report['until']}: "
        f"{report['signals']:,}",
        f"  by status: {_counts(report['statuses'])}",
        f"  rejected: {rejections['signals']:,}; by reason: {_counts(rejections['reasons'])}",
        f"  duplicates: {duplicates['events']:,} repeats of {duplicates['signals']:,} signals",
        "",
        f"  {'time from received to':<22}{'count':>9}{'p50':>12}{'p95':>12}{'p99':>12}"
        f"{'max':>12}",
    ]
    for step, figures in report["timings"].items():
        lines.append(f"  {step:<22}{figures['count']:>9,}"
                     + "".join(f"{_span(figures[k]):>12}" for k in ("p50", "p95", "p99", "max")))
    lines += ["", f"  stuck (not final for over {human(stuck['after_seconds'])}): "
                  f"{stuck['total']:,}"]
    for signal in stuck["signals"]:
        extra = ", ".join(f"{k} {signal[k]}" for k in ("ticker", "claimed_by") if signal[k])
        lines.append(f"    {signal['signal_id']}  {signal['status']} since {signal['since']}"
                     + (f"  ({extra})" if extra else ""))
    if stuck["total"] > len(stuck["signals"]):
        lines.append(f"    … and {stuck['total'] - len(stuck['signals']):,} more "
                     "(list them with GET /api/signals or signalbox audit export --signals)")
    return "\n".join(lines)
