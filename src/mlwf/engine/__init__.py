"""The engine: runs a workflow's stage calls on a backend, and accounts for them.

* :mod:`~mlwf.engine.driver`: :class:`~mlwf.engine.driver.Engine` and
  :class:`~mlwf.engine.driver.Run` (start, resume, run calls, finish);
* :mod:`~mlwf.engine.scheduling`: the concurrent call loop, the only place calls are retried,
  as :mod:`~mlwf.engine.retry` (the one retry policy) says;
* :mod:`~mlwf.engine.accounting`, :mod:`~mlwf.engine.checkpoints`: what calls cost; finished
  calls kept for ``--resume``;
* :mod:`~mlwf.engine.progress`: the one progress protocol;
* :mod:`~mlwf.engine.calls`: what crosses between driver and worker (plain data);
* :mod:`~mlwf.engine.runner`: one call in a worker (inputs in, stage function, outputs out);
* :mod:`~mlwf.engine.layout`: every key a run writes;
* :mod:`~mlwf.engine.trace`, :mod:`~mlwf.engine.faults`: timelines, and faults for tests.

Where calls run is a backend's business (:mod:`mlwf.backends`); the engine
knows only their contract (:mod:`mlwf.backends.base`) and no workflow's
domain: what a stage takes and gives is in its definition
(:mod:`mlwf.workflows.definition`).
"""
