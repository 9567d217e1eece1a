"""Watching the system: Prometheus metrics counted from the change feed (``metrics``), the seed's
KPIs computed from task records (``stats``, pure), and the live watchers every process runs
(``live``: feed → SSE fan-out, feed → metrics). The routes that serve them are in
service/http/ops.py.

May import statemachine and the service's settings; nothing of http, steps or runtime.
"""
