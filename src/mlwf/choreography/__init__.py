"""Choreography: a workflow run by its stages' events, with no driver process.

The reference runs its Knative version this way: each stage, when it
finishes, sends the events that start the next stages, and Knative Eventing
(a Broker and Triggers, or Channels and Subscriptions) delivers them. mlwf
does the same, and keeps the whole state of a run in the store, so that any
replica of any service can take the next step and a restarted service picks a
half-finished run up again:

* :mod:`~mlwf.choreography.replay` reads a run's state through the
  workflow's own driver function (``training.drive``, ``inference.drive``):
  replaying it against the calls already recorded as done says which stage
  batch comes next and with which arguments, or, once every stage is done,
  runs the driver's final steps (publish, merge results, report). So the
  choreographed run makes exactly the calls, the model and the report the
  driver would; nothing of a workflow's shape is written down twice.
* :mod:`~mlwf.choreography.records` holds what servers decide through the
  store: the run record (``run.json``, changed by compare-and-swap), the
  claims that let one call run once at a time across replicas, and the
  create-if-absent markers that let one finisher of a stage batch emit the
  next batch (the fan-in).
* :mod:`~mlwf.choreography.steps`: what a server does with a start event and
  with a stage event (run or skip the call, record it, decide what to emit).
* :mod:`~mlwf.choreography.sinks`: where events go (``--sink``, ``K_SINK``)
  and their delivery, with retries and a dead-letter sink.
* :mod:`~mlwf.choreography.invoke`: ``mlwf invoke``, the start event and
  following a run through the store.
* :mod:`~mlwf.choreography.service`: the hook ``mlwf serve`` calls for
  choreographed events.

What it costs against the driver. Both modes make the same calls with the
same arguments, so the same model bytes and predictions (checked by
``benchmarks/choreography.py`` and the tests). Choreography saves the
driver's round trips (a reply to the driver, then its next POST) and adds
the store bookkeeping that lets any replica take the next step: per call a
claim (one create-if-absent write) and a read of the run record before it
runs; after it, the done record (the driver writes one too), a listing of the
run folder and the earlier stages' done records (the replay); per stage batch
one marker; and the start event's hop to the first stage. At the seed's sizes
the two are within the run-to-run spread of a shared 2-core machine: five
sessions gave median ratios (choreography / driver) of 0.68–1.03 for training
2k ``2 8`` and 0.86–0.98 for inference 1k 16-way (2026-11-28), the latest
1.05 and 1.03 (2026-12-06, ``17f6e9f``); so "no slower than the driver"
holds within that noise, not beyond it. From 200-way fan-out on it is faster
(0.69× at 1,000-way). Replaying a finished training run's driver takes
3.6 ms on a directory store (mean of 20 :func:`~mlwf.choreography.replay.replay` calls).
"""
