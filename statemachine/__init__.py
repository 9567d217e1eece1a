"""The task lifecycle: states, transitions, the task record, stores, the change feed, the reaper.

Knows nothing of HTTP or providers.
"""
