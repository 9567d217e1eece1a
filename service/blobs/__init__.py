"""Where uploads and outputs live: the ``BlobStore`` port and its key helpers (``base``), local
files served through signed expiring URLs (``local``; the route is service/http/files.py), and
S3/MinIO on the minio SDK (``s3``). service/runtime.py picks one from ``HOOKLINE_BLOB_URL``.

May import statemachine (errors, clock); nothing of http, steps or runtime.
"""
