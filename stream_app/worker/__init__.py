"""The worker's orchestration: one role per module, each given what it needs by its constructor.

* :mod:`~stream_app.worker.runtime`: the composition root (stores from the settings, roles);
* :mod:`~stream_app.worker.batches`: a batch of events until it has taken effect (retries);
* :mod:`~stream_app.worker.timer`: watermarks, the deadline timer, the cluster sweep;
* :mod:`~stream_app.worker.clusters`: step baselines and the shared cluster model;
* :mod:`~stream_app.worker.publisher`: outputs to their sinks before the ack;
* :mod:`~stream_app.worker.reader`: the profile read view (HTTP and CLI);
* :mod:`~stream_app.worker.app`: the Faust app driving them (``stream-app worker``).

The decisions themselves are pure and live outside (contract, profile, reactions, segments,
triggers); see ``docs/architecture.md``.
"""
