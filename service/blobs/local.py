"""Blobs as files under a root directory, served by hookline itself through signed, expiring URLs.

A URL is ``{public_url}/files/{key}?exp=<unix seconds>&sig=<urlsafe HMAC-SHA256(key, exp)>``. The
signature is checked before anything touches the disk, so an unsigned caller can't even learn
whether a key exists. Writes go to a temporary file in the same directory and are moved into place
with ``os.replace``: a reader sees the old bytes or the new bytes, never half of either.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path
from urllib.parse import quote

from service.blobs.base import validate_key, validate_prefix
from statemachine import clock
from statemachine.errors import BadRequest, HooklineError, NotFound

SECRET_FILE = "secret.key"
SECRET_BYTES = 32


STALE_TEMP_S = 60.0  # a temp file this old belongs to a writer that died


class UrlRefused(HooklineError):
    """A file URL that may not be served: one of the two below."""

    code = "url_refused"


class UrlExpired(UrlRefused):
    """A correctly signed file URL whose ``exp`` has passed."""

    code = "url_expired"


class BadSignature(UrlRefused):
    """A file URL that is unsigned, malformed or tampered with."""

    code = "bad_signature"


class LocalBlobStore:
    """``BlobStore`` on the local file system. All file I/O runs in threads."""

    def __init__(self, root: Path, public_url: str, secret: bytes, *, fsync: bool = True) -> None:
        if not secret:
            raise ValueError("LocalBlobStore needs a non-empty secret")
        self.root = root
        self.public_url = public_url.rstrip("/")
        self._secret = secret
        self._fsync = fsync

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    # -- BlobStore -------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write atomically; the content type served later is implied by the key's extension."""
        await asyncio.to_thread(self._put_sync, self._path(key), data)

    def _put_sync(self, path: Path, data: bytes) -> None:
        for attempt in range(3):
            try:  # the directory usually exists: it is made only when it does not
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                break
            except FileNotFoundError:
                if attempt == 2:  # a concurrent delete_prefix removed the emptied directory
                    raise
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self._fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no blob {key!r}", code="blob_not_found") from None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        return await asyncio.to_thread(self._list_sync, prefix)

    def _list_sync(self, prefix: str) -> list[str]:
        # Walk only the deepest directory the prefix names, then filter by string prefix (S3-like).
        start = self.root / prefix.rpartition("/")[0]
        if not start.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue  # temp files of writes in flight
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    async def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix, allow_empty=False)
        return await asyncio.to_thread(self._delete_sync, prefix)

    def _delete_sync(self, prefix: str) -> int:
        deleted = 0
        parents: set[Path] = set()
        for key in self._list_sync(prefix):
            path = self.root / key
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                deleted += 1
            parents.update(p for p in path.parents if p != self.root and self.root in p.parents)
        parents.update(self._drop_stale_temp_files(prefix))
        # Drop directories left empty, deepest first; one still in use (a write racing in) stays.
        for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        return deleted

    def _drop_stale_temp_files(self, prefix: str) -> set[Path]:
        """Remove temp files a killed writer left under ``prefix`` (old enough that no live write
        can own them); return their directories."""
        base = (
            self.root / prefix.rstrip("/") if prefix.endswith("/") else (self.root / prefix).parent
        )
        dirs: set[Path] = set()
        if not base.is_dir() or self.root not in (base, *base.parents):
            return dirs
        cutoff = clock.now() - STALE_TEMP_S
        for tmp in base.rglob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    dirs.update(p for p in tmp.parents if p != self.root and self.root in p.parents)
        return dirs

    async def url(self, key: str, ttl_s: int) -> str:
        validate_key(key)
        if ttl_s < 1:
            raise BadRequest("URL lifetime must be at least 1 s", code="bad_ttl")
        exp = int(clock.now()) + int(ttl_s)
        return f"{self.public_url}/files/{quote(key)}?exp={exp}&sig={self.sign(key, exp)}"

    async def ping(self) -> None:
        def check() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise PermissionError(f"blob root {self.root} is not writable")

        await asyncio.to_thread(check)

    async def close(self) -> None:
        return None

    # -- signatures ------------------------------------------------------------------------------

    def sign(self, key: str, exp: int) -> str:
        """The urlsafe base64 HMAC-SHA256 of ``key`` and ``exp`` (no padding)."""
        mac = hmac.new(self._secret, f"{key}\n{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def verify_signature(self, key: str, exp: str | int, sig: str, now: float) -> None:
        """Raise ``BadSignature`` for a missing/tampered signature, ``UrlExpired`` for a genuine
        one past its expiry (both ``UrlRefused``). The signature is checked first, so
        editing ``exp`` never turns into "expired" instead of "tampered"."""
        try:
            exp_i = int(exp)
        except (TypeError, ValueError):
            raise BadSignature("file URL has a malformed expiry") from None
        if not sig or not hmac.compare_digest(self.sign(key, exp_i).encode(), sig.encode()):
            raise BadSignature("file URL signature does not match")
        if now >= exp_i:
            raise UrlExpired("file URL has expired", details={"expired_at": exp_i})


def load_or_create_secret(var_dir: Path) -> bytes:
    """The file-URL signing key in ``var_dir/secret.key``, created on first use.

    Several processes may start at once: each writes a candidate to its own temp file and tries to
    ``os.link`` it into place. Linking never overwrites, so exactly one candidate wins and every
    process reads that one. The file is complete before it has its final name.
    """
    var_dir.mkdir(parents=True, exist_ok=True)
    path = var_dir / SECRET_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=var_dir, prefix=".secret-")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secrets.token_hex(SECRET_BYTES) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    text = path.read_text(encoding="ascii").strip()
    if not text:
        raise RuntimeError(f"{path} is empty; delete it to generate a new key")
    return bytes.fromhex(text)
