"""Telling the client: signed outbound webhooks from a durable outbox.

    change feed ──▶ OutboxFeeder (a Watcher's handler) ──▶ Outbox (stored) ──▶ Deliverer ──▶ client

``feeder.OutboxFeeder`` turns each task change into one message per destination that wants it
(the owner's registered endpoints; the task's own ``webhook`` for how it ended), its body the task
as the API shows it, its id derived from (destination, task, version). ``deliverer.Deliverer``
claims due messages with a lease, signs each with Standard Webhooks (the ``standardwebhooks``
library) under every secret that is live for its destination, posts it under the same SSRF rules
as input fetches (service/media/fetch.py: resolved, checked and pinned at each try; no redirect
followed), and settles it: any 2xx delivers; 410 disables the endpoint; anything else is tried
again with exponential backoff and jitter until the retry horizon, then fails.

Both run in processes with the ``dispatcher`` role. The records and the retry schedule are
statemachine/outbox.py; the routes are service/http/outbound.py.
"""
