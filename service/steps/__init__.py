"""The leased steps and what starts them.

``runner`` claims a task's lease by compare-and-set, keeps it alive while a step works, hands
the task back after a transient failure and drains at shutdown; ``processing`` (submit the job)
and ``watermarking`` (copy, watermark, store the outputs) are the two steps; ``outcomes`` applies
the outcome rules of statemachine/rules.py (judge, compare-and-set, then side effects) for the
webhook receiver, the reaper and the steps; ``dispatcher`` is the one rule for who starts a step:
the change feed, with the reaper as the backstop.

May import statemachine, callbacks, media, blobs and the service's top modules (settings,
timings, styles, background); never http or runtime.
"""
