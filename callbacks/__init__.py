"""Everything about AI providers: the Provider port (``provider``), the adapters (``replicate``,
``fal``, ``bfl``), signature schemes (``standard_webhooks``), shared HTTP plumbing (``http``), the
inbound webhook receiver (``receiver``), and the provider simulator (``simulator/``).

May import statemachine; never service/ (the registry that builds providers from settings is
service/providers.py).
"""
