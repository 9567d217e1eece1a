"""Bytes of images: decoding and normalising uploads and inputs (``images``), the watermark
(``watermark``), the SSRF-safe fetcher that downloads inputs and provider outputs (``fetch``), and
the memory budget every fetch and decode of a process shares (``budget``). Synchronous Pillow work
runs in threads, never on the event loop.

May import statemachine (errors) and the service's settings; nothing of http, steps or runtime.
"""
