"""Bytes of images: decoding and normalising uploads and inputs (``images``), the watermark
(``watermark``), and the SSRF-safe fetcher that downloads inputs and provider outputs (``fetch``).
Synchronous Pillow work runs in threads, never on the event loop.

May import statemachine (errors) and the service's settings; nothing of http, steps or runtime.
"""
