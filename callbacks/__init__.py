"""Everything about AI providers: the Provider port, adapters, signatures, the webhook receiver,
and the provider simulator."""
