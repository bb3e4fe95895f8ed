"""Faust agents: thin glue from topics to :class:`stream_app.app.Runtime`. No decisions here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import faust

    from stream_app.app import Runtime


def register_all(app: faust.App, runtime: Runtime) -> None:
    from agents import events

    events.register(app, runtime)
