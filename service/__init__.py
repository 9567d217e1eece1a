"""The running process, in rooms by concern.

    http/    the HTTP face: routes, views, OpenAPI, SSE, dashboard, auth, errors, rate limits
    steps/   the leased steps and what starts them: runner, processing, watermarking, applying
             outcomes, dispatcher
    media/   images, the watermark, the SSRF-safe fetcher
    blobs/   the BlobStore port and its adapters (local files, S3/MinIO)
    ops/     metrics, the seed's KPIs, the live feed watchers

At the top: ``settings`` (every knob), ``runtime`` (builds and runs one process's parts, without
HTTP), ``providers`` (the provider registry built from settings), ``styles`` (the catalogue),
``timings``, ``background``, ``logging`` and the ``cli``. Imports run downwards: http → runtime →
steps → media/blobs/ops → statemachine and callbacks; only http (and the CLI) import http.
"""
