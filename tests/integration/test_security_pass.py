"""The security pass: keys compared as digests and never logged, secrets in no operational output,
strict headers on the HTML pages, the dashboard keeping the key to the session.

Covered elsewhere and not repeated here: CORS off by default and callback tokens of at least 128
bits bound to one task (test_security.py); the webhook route taking only POST, with a size limit
(test_webhook_route.py: ``test_get_on_the_webhook_route_is_405``,
``test_oversized_delivery_is_413``); the dashboard storing the key in sessionStorage only when
"remember" is not ticked, in a browser (tests/browser/test_dashboard.py).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from service.http.auth import hash_key
from tests.support.hookline import running_hookline

ROOT = Path(__file__).resolve().parents[2]
SECRET_NAMES = re.compile(r"key|token|secret|sig|digest|hash", re.I)


async def test_a_near_miss_key_is_refused(tmp_path: Path) -> None:
    """A key of the same length differing in one character, a prefix and an extension of a real
    key all fail like any invalid key."""
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice")
        last = "A" if key[-1] != "A" else "B"
        near_misses = [key[:-1] + last, key[: len(key) // 2], key[:-1], key + "x", key.upper()]
        for wrong in near_misses:
            r = await hl.client.get("/v1/me", headers=hl.auth(wrong))
            assert r.status_code == 401, wrong
            assert r.json()["error"]["code"] == "invalid_key"
        assert (await hl.client.get("/v1/me", headers=hl.auth(key))).status_code == 200


def _equality_on_secrets(path: Path) -> list[str]:
    """``==``/``!=`` comparisons in ``path`` with an operand whose source names a key, token,
    secret, signature, digest or hash."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
        ):
            operands = [node.left, *node.comparators]
            if any(SECRET_NAMES.search(ast.unparse(o)) for o in operands):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_secrets_are_compared_as_digests_or_in_constant_time() -> None:
    """API keys are looked up by their SHA-256 (auth.py never compares a raw key); callback
    tokens, metrics tokens and file-URL signatures go through ``hmac.compare_digest``."""
    auth = ROOT / "service" / "http" / "auth.py"
    source = auth.read_text()
    assert "hashlib.sha256(key.encode())" in source
    assert re.search(r"user_by_key_hash\(key_hash\)", source)
    assert _equality_on_secrets(auth) == []
    assert hash_key("hk_a") != hash_key("hk_b") and len(hash_key("hk_a")) == 64
    for path in ("callbacks/receiver.py", "service/http/ops.py", "service/blobs/local.py"):
        file = ROOT / path
        assert "hmac.compare_digest(" in file.read_text(), path
        assert _equality_on_secrets(file) == [], path


async def test_keys_and_tokens_never_reach_the_logs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """With debug logs on: requests with a valid key, a wrong key, webhooks with the real tokens
    (the simulator's deliveries) and a forged one; neither key nor token is in the output."""
    async with running_hookline(tmp_path, log_level="debug", log_format="json") as hl:
        key = await hl.create_user("alice")
        wrong = "hk_" + "W" * 43
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        assert (await hl.client.get("/v1/me", headers=hl.auth(wrong))).status_code == 401
        stored = await hl.store.get_task(task["id"])
        assert stored is not None
        forged = await hl.client.post(
            f"/v1/callbacks/sim/{task['id']}",
            params={"token": stored.callback_token + "x"},
            json={"id": "p1", "status": "succeeded"},
        )
        assert forged.status_code == 401
    out, err = capfd.readouterr()
    logs = out + err
    assert "webhook_rejected" in logs  # the capture does see the service's logs
    for secret in (key, wrong, stored.callback_token, hash_key(key)):
        assert secret not in logs


async def test_secrets_are_in_no_operational_output(tmp_path: Path) -> None:
    """/v1/stats (user and admin), /metrics, /v1/me and the API documents show none of the
    configured secrets, API keys or callback tokens."""
    secrets = {
        "secret_key": "file-url-signing-secret-0123456789",
        "s3_access_key": "s3-access-key-0123456789",
        "s3_secret_key": "s3-secret-key-0123456789",
        "replicate_api_token": "r8_replicate-token-0123456789",
        "replicate_webhook_secret": "whsec_cmVwbGljYXRlLXNlY3JldA==",
        "fal_key": "fal-key-0123456789:abcdef",
        "bfl_api_key": "bfl-key-0123456789",
        "metrics_token": "metrics-token-0123456789",
    }
    async with running_hookline(tmp_path, **secrets) as hl:
        key = await hl.create_user("alice")
        admin = await hl.create_user("root", credits=0, admin=True)
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        stored = await hl.store.get_task(task["id"])
        assert stored is not None
        bodies = [
            await hl.client.get("/v1/stats", headers=hl.auth(key)),
            await hl.client.get("/v1/stats", headers=hl.auth(admin)),
            await hl.client.get(
                "/metrics", headers={"Authorization": "Bearer " + secrets["metrics_token"]}
            ),
            await hl.client.get("/v1/me", headers=hl.auth(key)),
            await hl.client.get(f"/v1/tasks/{task['id']}", headers=hl.auth(key)),
            await hl.client.get("/openapi.json"),
            await hl.client.get("/openapi-3.0.json"),
        ]
        assert [r.status_code for r in bodies] == [200] * len(bodies)
        assert "hookline_transitions" in bodies[2].text
        shown = "\n".join(r.text for r in bodies)
        for secret in [*secrets.values(), key, admin, hash_key(key), stored.callback_token]:
            assert secret not in shown


@pytest.mark.parametrize("path", ["/", "/docs", "/docs/init.js", "/static/app.js"])
async def test_pages_send_strict_security_headers(tmp_path: Path, path: str) -> None:
    async with running_hookline(tmp_path) as hl:
        r = await hl.client.get(path)
        assert r.status_code == 200
        csp = [d.strip() for d in r.headers["content-security-policy"].split(";")]
        assert csp[0] == "default-src 'self'"
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert "unsafe-inline" not in r.headers["content-security-policy"]
        assert "unsafe-eval" not in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"


def test_the_dashboard_keeps_the_key_to_the_session_unless_remembered() -> None:
    """service/http/static/app.js: the key goes to sessionStorage; to localStorage only under the
    "remember" flag; never to a cookie or a URL."""
    source = (ROOT / "service" / "http" / "static" / "app.js").read_text()
    local_writes = [line.strip() for line in source.splitlines() if "localStorage.setItem" in line]
    assert local_writes == ["if (remember) localStorage.setItem(KEY_NAME, key);"]
    assert "sessionStorage.setItem(KEY_NAME, key);" in source
    assert "document.cookie" not in source
    assert not re.search(r"[?&](key|api_key|token)=", source)


async def test_a_non_ascii_file_signature_is_refused_not_a_server_error(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl:
        r = await hl.client.get("/files/uploads/x.jpg", params={"exp": "9999999999", "sig": "é"})
        assert r.status_code == 403
        sim = await hl.client.get(
            "/sim/v1/files/p1/0.png", params={"exp": "9999999999", "sig": "é"}
        )
        assert sim.status_code in (403, 404)
