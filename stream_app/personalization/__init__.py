"""What the app shows a user now: checklists and flags by segment or cluster, and next-feature
recommendations. Pure decision logic (:mod:`.config`, :mod:`.decide`, :mod:`.recommend`);
the I/O lives in the collector (:mod:`stream_app.collector.decisions`) and the worker
(:mod:`stream_app.worker.recommender`)."""
