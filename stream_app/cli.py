"""The ``stream-app`` command line.

stream-app demo              embedded broker + Redis + worker + synthetic stream + live view
stream-app worker            run the worker against KAFKA_BOOTSTRAP_SERVERS and REDIS_URL
stream-app collector         the HTTP front door: Segment's tracking API -> onboarding.events
stream-app deliver          relay onboarding.triggers to HTTPS webhooks (signed, retried, at least once)
stream-app topics apply      create/update the topics declared in topics/topics.toml
stream-app profile USER_ID   print a user's profile as JSON
stream-app report            trigger lift: treated vs holdout completion with 95% intervals
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from stream_app.errors import ConfigError, StreamAppError
from stream_app.settings import Settings

DEMO_STATE = Path(".stream-app") / "demo.json"

CONFIG_HELP = """configuration (environment variables; see README for all):
  KAFKA_BOOTSTRAP_SERVERS  host:port[,host:port] of the Kafka cluster
  REDIS_URL                redis://host:port/db of the profile store (REDIS_CLUSTER=true for Cluster)
  PII_HASH_SALT            secret salt of email/phone hashes (required: the default is refused)
  WEB_HOST, WEB_PORT       the worker's HTTP server (/profiles/<id>, /stats/steps, /metrics,
                           /healthz liveness, /readyz readiness)
  API_TOKENS               bearer tokens for /profiles and /stats (required unless WEB_HOST is
                           loopback)
  SHUTDOWN_TIMEOUT_SECONDS SIGTERM exits within this long (default 20), broker or Redis gone
  KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD,
  KAFKA_SSL_CAFILE ...     passed through to the Kafka clients
"""


def _cmd_worker(args: argparse.Namespace) -> int:
    settings = Settings.load()
    bootstrap, _ = settings.require_services()
    if args.apply_topics:
        from stream_app.topics import apply_topics

        for line in apply_topics(settings, bootstrap):
            print(line, file=sys.stderr)
    from stream_app.logs import setup_logging
    from stream_app.worker.app import create_app
    from stream_app.worker.shutdown import Worker

    setup_logging(settings.log_level, settings.log_format)

    app, _runtime = create_app(settings)
    worker = Worker(
        app,
        loglevel=settings.log_level,
        override_logging=False,  # our JSON handler (set up above) stays the only one
        quiet=True,
        shutdown_timeout=settings.shutdown_timeout_seconds,
    )
    worker.execute_from_commandline()
    return 0


def _cmd_collector(args: argparse.Namespace) -> int:
    settings = Settings.load()
    from stream_app.collector.server import run
    from stream_app.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    run(settings)
    return 0


COLLECTOR_HELP = """configuration (environment variables; see README "Front door"):
  KAFKA_BOOTSTRAP_SERVERS    the Kafka cluster to produce to (and KAFKA_SECURITY_PROTOCOL ...)
  COLLECTOR_HOST, _PORT      where to listen (default 127.0.0.1:8088)
  COLLECTOR_WRITE_KEYS       accepted write keys, comma-separated; source=key names a key's source
  COLLECTOR_ALLOW_ANONYMOUS  true: accept requests without a known key (demos only)
  COLLECTOR_ALLOWED_ORIGINS  browser origins allowed by CORS, comma-separated (* = any)

Point an SDK at it: analytics-node {host: 'http://HOST:PORT'}, segment-analytics-python
host='http://HOST:PORT', analytics.js apiHost 'HOST:PORT/v1' (protocol http or https).
"""


def _cmd_deliver(args: argparse.Namespace) -> int:
    settings = Settings.load()
    from stream_app.delivery.relay import run
    from stream_app.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    run(settings)
    return 0


DELIVER_HELP = """configuration (environment variables; see README "Webhook delivery"):
  KAFKA_BOOTSTRAP_SERVERS  the Kafka cluster (and KAFKA_SECURITY_PROTOCOL ...)
  WEBHOOKS_FILE            the endpoints (config/webhooks.example.toml shows the format)
  WEBHOOK_SECRET_...       each endpoint's signing secret, in the variable its secret_env names
  DELIVER_HOST, _PORT      where /metrics and /healthz are served (default 127.0.0.1:8090)
  TOPIC_WEBHOOK_DLQ        where undeliverable triggers go (onboarding.triggers.webhooks.dlq)
"""


def _cmd_topics(args: argparse.Namespace) -> int:
    settings = Settings.load()
    if not settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", "not set; `topics apply` needs a broker")
    from stream_app.topics import apply_topics

    for line in apply_topics(settings, settings.kafka_bootstrap_servers):
        print(line)
    return 0


def _store_settings() -> Settings:
    """Settings for commands that only read Redis; a running demo's Redis when REDIS_URL is unset."""
    overrides = {}
    if not os.environ.get("REDIS_URL") and DEMO_STATE.exists():
        state = json.loads(DEMO_STATE.read_text())
        overrides["redis_url"] = state["redis_url"]
        print(f"(REDIS_URL not set: reading the running demo's Redis {state['redis_url']})", file=sys.stderr)
    settings = Settings.load(**overrides)
    if not settings.redis_url:
        raise ConfigError("REDIS_URL", "not set; point it at the profile store")
    return settings


def _cmd_report(args: argparse.Namespace) -> int:
    settings = _store_settings()
    if args.what == "bandit":
        return _report_bandit(settings, args)
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from stream_app.report import (
        arm_outcomes,
        engagement,
        engagement_rows,
        experiments,
        funnel,
        funnel_rows,
        lift,
        outcomes,
    )
    from stream_app.worker.runtime import Stores

    per_profile: Any = {  # the rows the chosen report reads from each profile
        "lift": outcomes,
        "engagement": engagement_rows,
        "experiments": arm_outcomes,
        "funnel": lambda doc: funnel_rows(doc, args.by),
    }[args.what]

    async def collect() -> list[Any]:
        stores = Stores(settings)
        rows: list[Any] = []
        try:
            with Progress(transient=True, console=Console(stderr=True)) as progress:
                task = progress.add_task("reading profiles", total=None)
                async for doc in stores.profiles.documents():
                    rows.extend(per_profile(doc))
                    progress.advance(task)
        finally:
            await stores.close()
        return rows

    rows = asyncio.run(collect())
    if args.what == "funnel":
        return _print_funnel(funnel(rows), args)
    if args.what == "experiments":
        compared = [c for c in experiments(rows, args.min_effect) if args.type in (None, c.trigger_type)]
        return _print_experiments(compared, args)
    if args.what == "engagement":
        chosen = [e for e in engagement(rows) if args.type in (None, e.trigger_type)]
        return _print_engagement(chosen, args)
    results = [r for r in lift(rows) if args.type is None or r.trigger_type == args.type]
    if args.json:
        sys.stdout.write(
            orjson.dumps([r.as_dict() for r in results], option=orjson.OPT_INDENT_2).decode() + "\n"
        )
        return 0
    table = Table(title="Trigger lift: completion after the trigger, treated vs held-out control (95% CI)")
    for column in (
        "trigger",
        "treated n",
        "treated rate",
        "control n",
        "control rate",
        "difference",
        "95% CI",
    ):
        table.add_column(column, justify="left" if column == "trigger" else "right")

    def pct(x: float) -> str:
        return "-" if x != x else f"{100 * x:.1f}%"

    for r in results:
        low, high = r.interval()
        lo_t, hi_t = r.treatment.wilson()
        lo_c, hi_c = r.control.wilson()
        table.add_row(
            r.trigger_type,
            str(r.treatment.n),
            f"{pct(r.treatment.rate)} [{pct(lo_t)}, {pct(hi_t)}]",
            str(r.control.n),
            f"{pct(r.control.rate)} [{pct(lo_c)}, {pct(hi_c)}]",
            pct(r.difference),
            f"[{pct(low)}, {pct(high)}]",
        )
    Console().print(table)
    if not results:
        print("no trigger decisions recorded yet", file=sys.stderr)
    return 0


def _report_bandit(settings: Settings, args: argparse.Namespace) -> int:
    """The bandit's arms as stored in Redis (no profile scan), per type, context and variant."""
    from rich.console import Console
    from rich.table import Table

    from stream_app.configure import trigger_config
    from stream_app.report import bandit_arms
    from stream_app.worker.runtime import Stores

    config = trigger_config(settings)
    types = [t.name for t in config.types.values() if t.policy == "bandit" and args.type in (None, t.name)]

    async def read() -> Any:
        stores = Stores(settings)
        try:
            return await stores.bandit.arms(types)
        finally:
            await stores.close()

    rows = bandit_arms(asyncio.run(read()) if types else {}, config)
    if args.json:
        sys.stdout.write(
            orjson.dumps([r.as_dict() for r in rows], option=orjson.OPT_INDENT_2).decode() + "\n"
        )
        return 0
    title = "Bandit arms: pulls (treated triggers sent), rewards (reported back), rate with 95% CI, share now"
    table = Table(title=title)
    for column in ("trigger", "context", "variant", "pulls", "rewards", "rate", "share now"):
        table.add_column(column, justify="left" if column in ("trigger", "context", "variant") else "right")
    for r in rows:
        low, high = r.result.wilson()
        rate = f"{100 * r.result.rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}]" if r.result.n else "-"
        table.add_row(r.trigger_type, r.context, r.variant, str(r.result.n), str(r.result.successes), rate,
                      f"{100 * r.share_now:.0f}%")  # fmt: skip
    Console().print(table)
    if not rows:
        print(
            'no trigger type runs a bandit (policy = "bandit"), or none has sent a trigger yet',
            file=sys.stderr,
        )
    return 0


def _print_funnel(results: list[Any], args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.json:
        dump = orjson.dumps([f.as_dict() for f in results], option=orjson.OPT_INDENT_2)
        sys.stdout.write(dump.decode() + "\n")
        return 0
    table = Table(title=f"Funnel by {args.by}: started, completed, dropped (stalled or abandoned) per step")
    for column in (args.by, "flow", "step", "started", "completed", "dropped", "median time to complete"):
        table.add_column(column, justify="right" if column in ("started", "completed", "dropped") else "left")
    for f in results:
        median = "-" if f.median_s != f.median_s else f"{f.median_s:.0f} s"
        table.add_row(f.group, f.flow, f.step, str(f.started), str(f.completed), str(f.dropped), median)
    Console().print(table)
    if not results:
        print("no onboarding steps recorded yet", file=sys.stderr)
    return 0


def _print_experiments(results: list[Any], args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.json:
        dump = orjson.dumps([c.as_dict() for c in results], option=orjson.OPT_INDENT_2)
        sys.stdout.write(dump.decode() + "\n")
        return 0
    table = Table(
        title=f"Experiments: completion after the trigger, variant against control and each other "
        f"(95% CI; fixed horizon for a {100 * args.min_effect:.1f}-point difference)"
    )
    for column in ("trigger", "a", "b", "a rate (n)", "b rate (n)", "difference [95% CI]", "verdict"):
        table.add_column(column)

    def pct(x: float) -> str:
        return "-" if x != x else f"{100 * x:.1f}%"

    for c in results:
        low, high = c.lift.interval()
        table.add_row(
            c.trigger_type, c.a, c.b,
            f"{pct(c.lift.treatment.rate)} ({c.lift.treatment.n})",
            f"{pct(c.lift.control.rate)} ({c.lift.control.n})",
            f"{pct(c.lift.difference)} [{pct(low)}, {pct(high)}]",
            c.verdict(),
        )  # fmt: skip
    Console().print(table)
    if not results:
        print(
            "no trigger type runs an experiment (variants in the triggers file), or no data yet",
            file=sys.stderr,
        )
    return 0


def _print_engagement(results: list[Any], args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.json:
        sys.stdout.write(
            orjson.dumps([e.as_dict() for e in results], option=orjson.OPT_INDENT_2).decode() + "\n"
        )
        return 0
    table = Table(title="Intervention outcomes reported back (treated users; rates of delivered, 95% CI)")
    for column in ("trigger", "variant", "triggers", "delivered", "opened", "clicked", "dismissed"):
        table.add_column(column, justify="left" if column in ("trigger", "variant") else "right")

    def cell(e: Any, outcome: str) -> str:
        r = e.rate(outcome)
        low, high = r.wilson()
        return (
            f"{e.counts[outcome]} ({100 * r.rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}])" if r.n else "0"
        )

    for e in results:
        table.add_row(
            e.trigger_type, e.variant, str(e.triggers), str(e.counts["delivered"]),
            cell(e, "opened"), cell(e, "clicked"), cell(e, "dismissed"),
        )  # fmt: skip
    Console().print(table)
    if not results:
        print("no treated trigger recorded yet", file=sys.stderr)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    settings = _store_settings()

    from stream_app.worker.runtime import Stores, reader

    async def fetch() -> dict[str, object] | None:
        stores = Stores(settings)
        try:
            return await reader(settings, stores).read(args.user_id)
        finally:
            await stores.close()

    doc = asyncio.run(fetch())
    if doc is None:
        print(f"no profile for {args.user_id!r} (unknown or erased)", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stream_app.demo import run_demo

    return run_demo(users=args.users, rate=args.rate, time_scale=args.time_scale, duration=args.duration)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-app",
        description="Real-time onboarding personalization engine: Kafka events -> Redis profiles, "
        "segments and triggers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=CONFIG_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run everything locally: embedded broker and Redis, the worker, "
        "a synthetic onboarding stream and a live view (Ctrl-C stops)",
    )
    demo.add_argument("--users", type=int, default=2000, help="simulated users (default 2000)")
    demo.add_argument("--rate", type=float, default=500.0, help="events per second to send (default 500)")
    demo.add_argument(
        "--time-scale",
        type=float,
        default=0.02,
        help="compress the users' real think times by this factor (default 0.02)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    demo.set_defaults(func=_cmd_demo)

    worker = sub.add_parser(
        "worker",
        help="run the stream worker against KAFKA_BOOTSTRAP_SERVERS / REDIS_URL",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument(
        "--apply-topics", action="store_true", help="create/update the declared topics before starting"
    )
    worker.set_defaults(func=_cmd_worker)

    collector = sub.add_parser(
        "collector",
        help="the HTTP front door: accepts Segment's HTTP tracking API (/v1/track, /v1/batch, ...) "
        "from analytics SDKs and browsers and produces to onboarding.events",
        description="A stateless HTTP server (scale it behind a load balancer): each request's events "
        "are validated with the engine's contract and produced to onboarding.events (or the dead-letter "
        "topic with their reason); the answer is 200 only once the broker acknowledged them, 503 with "
        "Retry-After when it cannot (the SDKs retry).",
        epilog=COLLECTOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    collector.set_defaults(func=_cmd_collector)

    deliver = sub.add_parser(
        "deliver",
        help="relay onboarding.triggers to HTTPS webhooks (signed, retried, dead-lettered, at least once)",
        description="Consumes onboarding.triggers in a consumer group of its own and POSTs each trigger "
        "to every configured endpoint that wants its type, signed with HMAC-SHA256 and with the "
        "trigger_id as Idempotency-Key; retries with back-off while an endpoint is down or slow, puts "
        "what is refused or keeps failing on the webhook dead-letter topic, and commits offsets only "
        "after every trigger of a batch is settled.",
        epilog=DELIVER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    deliver.set_defaults(func=_cmd_deliver)

    topics = sub.add_parser("topics", help="manage the declared Kafka topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    apply = topics_sub.add_parser(
        "apply", help="create missing topics, raise partition counts, set configs (idempotent; never deletes)"
    )
    apply.set_defaults(func=_cmd_topics)

    report = sub.add_parser(
        "report",
        help="trigger lift: step/onboarding completion of treated users vs the holdout group, with 95%% CI",
        description="Reads every profile in REDIS_URL (or the running demo's Redis) and compares, per "
        "trigger type, how often users completed what the trigger was about after it: users who got "
        "the trigger against the holdout control group (HOLDOUT share per type in the triggers file).",
    )
    report.add_argument(
        "what",
        nargs="?",
        choices=["lift", "engagement", "experiments", "funnel", "bandit"],
        default="lift",
        help="lift (default): completion of treated vs held-out users; engagement: delivered, opened, "
        "clicked, dismissed as reported back with Intervention * events, per trigger type and variant; "
        "experiments: each variant against the control and the other variants, with a verdict; "
        "funnel: per flow step, started / completed / dropped and the median time, by --by; "
        'bandit: the arms of trigger types with policy = "bandit" (counts in Redis, per cluster)',
    )
    report.add_argument(
        "--by",
        choices=["all", "segment", "cluster"],
        default="segment",
        help="funnel: group users by rule segment (default), by cluster, or not at all",
    )
    report.add_argument(
        "--min-effect",
        type=float,
        default=0.05,
        help="experiments: the smallest completion-rate difference worth detecting, absolute "
        "(default 0.05 = 5 points); sets the sample size a verdict waits for",
    )
    report.add_argument("--type", default=None, help="only this trigger type (e.g. stalled_step)")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.set_defaults(func=_cmd_report)

    profile = sub.add_parser("profile", help="print a user's profile as JSON (reads REDIS_URL)")
    profile.add_argument("user_id", help="userId (or an anonymousId; merged ids resolve to their user)")
    profile.set_defaults(func=_cmd_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"stream-app: {exc}", file=sys.stderr)
        return 2
    except StreamAppError as exc:
        print(f"stream-app: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
