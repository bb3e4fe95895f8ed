"""``stream-app demo``: the whole engine on one machine, fed a synthetic stream, with a live view.

With nothing configured it starts an embedded Tansu broker and a private redis-server
on free ports (KAFKA_BOOTSTRAP_SERVERS / REDIS_URL, when set, are used instead),
applies the topics, runs ``stream-app worker`` and ``stream-app collector`` as
subprocesses and sends the synthetic onboarding stream of :mod:`stream_app.synthetic`
through the collector's HTTP API (the front door a frontend's SDK uses) in real time: an
event is sent when its (compressed) event time comes, at most ``rate`` events per second,
and its timestamp is rewritten to the send time, so the latencies shown are real.

* :mod:`~stream_app.demo.services`: the broker, Redis and the engine's processes;
* :mod:`~stream_app.demo.feed`: the synthetic stream and the sender;
* :mod:`~stream_app.demo.observer`: reading metrics and profiles for the view;
* :mod:`~stream_app.demo.view`: the live view; :mod:`~stream_app.demo.run`: the run itself.

Ctrl-C (or ``--duration``) stops sending, lets the worker drain, stops every process it
started and prints a summary whose last line is machine-readable::

    summary: sent=7469 broken=38 resent=35 applied=7469 dead_lettered=38 duplicates=35 ...
"""

from stream_app.demo.run import run_demo

__all__ = ["run_demo"]
