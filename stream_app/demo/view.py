"""The demo's live view (rich) and its plain progress line for logs."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from stream_app.demo.feed import SyntheticFeed
from stream_app.demo.stats import LATENCY_WINDOW_S, LiveStats, _ms


def render(stats: LiveStats, feed: SyntheticFeed) -> Group:
    """The live view: counters, the latest events sent, a few users' profiles."""
    s = stats
    minutes, seconds = divmod(int(s.elapsed()), 60)
    head = Table.grid(padding=(0, 2))
    for style in ("dim", "bold", "dim", "bold"):
        head.add_column(style=style, no_wrap=True, min_width=15 if style == "dim" else None)
    head.add_row(
        "elapsed",
        f"{minutes}:{seconds:02d} ({s.phase})",
        "users",
        f"{s.cohorts} x {feed.users} (a new cohort every {feed.wave_s:.0f} s)",
    )
    head.add_row("front door", f"{s.front_door}/v1/batch", "sent by", "HTTP, like an SDK")
    head.add_row(
        "sent", f"{s.sent:,} ({s.sent_rate:,.0f}/s)", "applied", f"{s.applied:,} ({s.applied_rate:,.0f}/s)"
    )
    head.add_row(
        "dead-lettered",
        f"{s.dead_lettered:,} / {s.broken:,} broken",
        "duplicates",
        f"{s.duplicates:,} / {s.resent:,} re-sent",
    )
    window = f"(last {LATENCY_WINDOW_S:.0f} s)"
    head.add_row("latency p50", f"{_ms(s.p50)} {window}", "latency p99", f"{_ms(s.p99)} {window}")
    head.add_row("profiles", f"{s.profiles:,}", "linked anon ids", f"{s.linked_ids:,}")
    fired = ", ".join(f"{k} {v}" for k, v in sorted(s.triggers.items())) or "none yet"
    head.add_row("triggers", fired, "held out / suppressed", f"{s.held_out:,} / {s.suppressed:,}")
    model = f"v{s.cluster_model}" if s.cluster_model else "training… (needs 200 samples)"
    head.add_row("segment changes", f"{s.segment_changes:,}", "cluster model", model)
    head.add_row("timer lag p50", _ms(s.timer_lag_p50), "", "")
    if s.delivery_errors or s.observer_error or s.retried_requests:
        head.add_row(
            "[red]problems",
            f"{s.delivery_errors} refused, {s.retried_requests} retried requests",
            s.observer_error[:60],
            "",
        )

    activity = Table(title="latest activity", title_justify="left", expand=True, box=box.SIMPLE_HEAD)
    activity.add_column("time", no_wrap=True, min_width=8)
    activity.add_column("user", no_wrap=True, min_width=18)
    activity.add_column("event", no_wrap=True, min_width=25)
    activity.add_column("step / feature", overflow="ellipsis")
    for row in list(s.recent):
        activity.add_row(row.time, row.user, row.event, row.detail)

    profiles = Table(
        title="recently active users (GET /profiles/<id>)",
        title_justify="left",
        expand=True,
        box=box.SIMPLE_HEAD,
    )
    profiles.add_column("user", no_wrap=True, min_width=18)
    profiles.add_column("profile")
    for user, line in reversed(list(s.summaries.items())):
        profiles.add_row(user, line)
    return Group(
        Panel(head, title="onboarding engine · live · Ctrl-C stops", title_align="left"), activity, profiles
    )


def progress_line(stats: LiveStats) -> str:
    """One plain line for logs when stdout is not a terminal (CI, pipes)."""
    s = stats
    return (
        f"[{s.elapsed():4.0f} s] sent {s.sent} ({s.sent_rate:.0f}/s) · applied {s.applied} "
        f"({s.applied_rate:.0f}/s) · dead-lettered {s.dead_lettered} · duplicates {s.duplicates} · "
        f"profiles {s.profiles} · p50/p99 {_ms(s.p50)}/{_ms(s.p99)}"
    )
