"""The task lifecycle: states and events as data (``states``), the task record (``task``), pure
decisions (``decide``; the outcome rules in ``rules``), persisting them with compare-and-set
(``lifecycle``), the TaskStore port (``store``) and its adapters with their feeds (``sqlite_*``,
``mongo_*``), consuming the change feed (``feed``), and the reaper (``reaper``).

Knows nothing of HTTP or providers: imports nothing from callbacks/ or service/ and no HTTP
library (tests/unit/test_layering.py).
"""
