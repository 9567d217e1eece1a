"""The OpenAPI document: it describes every route the app has, it is valid OpenAPI 3.1 (and its
3.0 rendition valid 3.0), and real responses of a real server validate against it — so the
document, the pydantic request models and the TypedDicts the handlers build cannot drift apart."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from PIL import Image

from service.http import openapi, openapi30
from service.http.app import create_app
from service.settings import Settings
from tests.browser.test_dashboard import ARTIFACTS, CHROMIUM, chromium
from tests.support.hookline import Hookline, running_hookline


@pytest.fixture
async def hl(tmp_path: Path) -> AsyncIterator[Hookline]:
    async with running_hookline(tmp_path) as hl:
        yield hl


async def document(hl: Hookline, path: str = "/openapi.json") -> dict[str, Any]:
    r = await hl.client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc: dict[str, Any] = r.json()
    return doc


NODE = shutil.which("node")


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), "purple").save(buf, "PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), "teal").save(buf, "JPEG")
    return buf.getvalue()


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items() for method in item}


def validator(doc: dict[str, Any], schema: str) -> Any:
    """A JSON Schema validator of the named component, resolving refs inside ``doc``."""
    root = {"$ref": f"#/components/schemas/{schema}", "components": doc["components"]}
    return jsonschema_rs.Draft202012Validator(root)


def assert_conforms(doc: dict[str, Any], schema: str, response: httpx.Response) -> None:
    assert response.headers["content-type"] == "application/json", response.text
    errors = [e.message for e in validator(doc, schema).iter_errors(response.json())]
    assert not errors, (schema, response.json(), errors)


def undocumented(app_routes: Any, doc: dict[str, Any]) -> set[tuple[str, str]]:
    documented = operations(doc)
    found = {
        (path.replace("{key:path}", "{key}"), method)
        for path, method in openapi.iter_routes(app_routes)
    }
    return found - documented


async def test_every_route_of_the_app_is_in_the_document(hl: Hookline) -> None:
    doc = await document(hl)
    assert undocumented(hl.app.routes, doc) == set()
    # and the walk does see the routes (mounted ones too): a new route would show up
    walked = set(openapi.iter_routes(hl.app.routes))
    assert ("/v1/callbacks/{provider}/{task_id}", "POST") in walked
    assert ("/files/{key:path}", "GET") in walked
    assert not any(path.startswith("/sim") for path, _ in walked)  # the simulator is not the API
    assert len(operations(doc)) == len(walked)


def test_an_undescribed_route_is_caught(tmp_path: Path) -> None:
    """The check above fails when a route is added without describing it."""
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, var_dir=tmp_path, blob_url=f"file://{tmp_path}/b", simulator=True
    )
    app = create_app(settings)
    app.router.routes.append(Mount("/extra", routes=[Route("/hello", hello)]))
    doc = openapi.build_document(app.routes)
    assert undocumented(app.routes, doc) == {("/extra/hello", "GET")}


async def test_the_documents_are_valid_openapi_31_and_30(hl: Hookline) -> None:
    validation = pytest.importorskip("openapi_spec_validator")
    doc31 = await document(hl)
    doc30 = await document(hl, "/openapi-3.0.json")
    assert doc31["openapi"] == "3.1.0" and doc30["openapi"] == "3.0.3"
    validation.validate(doc31)
    validation.validate(doc30)


async def test_the_contract_is_in_the_document(hl: Hookline) -> None:
    doc = await document(hl)
    paths = doc["paths"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert doc["security"] == [{"bearerAuth": []}]
    # one Error schema behind every error status of every route
    statuses: set[str] = set()
    for item in paths.values():
        for op in item.values():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    statuses.add(status)
                    name = response["$ref"].rsplit("/", 1)[1]
                    content = doc["components"]["responses"][name]["content"]
                    assert content == {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    }
    expected = {"400", "401", "402", "403", "404", "409", "413", "415", "422", "429", "503"}
    assert statuses == expected
    create = paths["/v1/tasks"]["post"]
    assert "202" in create["responses"] and "402" in create["responses"]
    assert [p["name"] for p in create["parameters"]] == ["Idempotency-Key"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateTaskBody"
    }
    webhook = paths["/v1/callbacks/{provider}/{task_id}"]["post"]
    assert webhook["security"] == []
    names = {(p["in"], p["name"]) for p in webhook["parameters"]}
    assert {
        ("query", "token"),
        ("header", "webhook-id"),
        ("header", "webhook-timestamp"),
        ("header", "webhook-signature"),
    } <= names
    assert (
        "text/event-stream"
        in paths["/v1/tasks/{task_id}/events"]["get"]["responses"]["200"]["content"]
    )
    # the request schema is the pydantic model's: unknown fields refused, limits carried over
    body = doc["components"]["schemas"]["CreateTaskBody"]
    assert body["additionalProperties"] is False
    assert body["properties"]["num_outputs"]["maximum"] == 4
    # the catalogue shows prices and what a user may choose, the plain default included
    schemas = doc["components"]["schemas"]
    assert {"cost", "price", "providers", "user_params"} <= set(schemas["Style"]["required"])
    assert set(schemas["StyleList"]["required"]) == {"items", "plain"}
    assert set(schemas["ParamRule"]["properties"]) == {
        "type",
        "minimum",
        "maximum",
        "choices",
        "max_length",
        "prices",
        "surcharges",
    }


async def test_real_responses_conform_to_the_document(hl: Hookline) -> None:
    doc = await document(hl)
    key = await hl.create_user("alice", credits=100)
    admin = await hl.create_user("root", credits=0, admin=True)
    auth = hl.auth(key)
    upload = await hl.client.post(
        "/v1/uploads",
        content=png(),
        headers={**auth, "Content-Type": "image/png"},
    )
    assert upload.status_code == 201
    assert_conforms(doc, "Upload", upload)
    created = await hl.client.post(
        "/v1/tasks",
        json={"inputs": [{"upload": upload.json()["key"]}], "prompt": "a lighthouse"},
        headers={**auth, "Idempotency-Key": "k1"},
    )
    assert created.status_code == 202
    assert_conforms(doc, "Task", created)
    task_id = created.json()["id"]
    done = await hl.wait_terminal(key, task_id)
    assert done["state"] == "completed" and done["outputs"]
    got = await hl.client.get(f"/v1/tasks/{task_id}", headers=auth)
    assert_conforms(doc, "Task", got)

    to_cancel = await hl.create_task(key)
    cancelled = await hl.client.post(f"/v1/tasks/{to_cancel['id']}/cancel", headers=auth)
    schema = "Task" if cancelled.status_code == 200 else "Error"
    assert_conforms(doc, schema, cancelled)
    await hl.wait_terminal(key, to_cancel["id"])
    listed = await hl.client.get("/v1/tasks", params={"limit": 1}, headers=auth)
    assert listed.json()["next"] is not None
    assert_conforms(doc, "TaskList", listed)
    assert_conforms(doc, "Me", await hl.client.get("/v1/me", headers=auth))
    assert_conforms(doc, "StyleList", await hl.client.get("/v1/styles", headers=auth))
    for who in (auth, hl.auth(admin)):
        assert_conforms(doc, "Stats", await hl.client.get("/v1/stats", headers=who))
    empty = await hl.client.get("/v1/stats", params={"window_s": 1}, headers=hl.auth(admin))
    assert_conforms(doc, "Stats", empty)
    assert_conforms(doc, "Status", await hl.client.get("/healthz"))
    assert_conforms(doc, "Status", await hl.client.get("/readyz"))

    async with hl.client.stream("GET", f"/v1/tasks/{task_id}/events", headers=auth) as events:
        frames = [line[6:] async for line in events.aiter_lines() if line.startswith("data: ")]
    assert frames
    for frame in frames:
        assert not list(validator(doc, "StateEvent").iter_errors(json.loads(frame)))

    errors = [
        await hl.client.get("/v1/me"),  # 401
        await hl.client.get("/v1/tasks/tsk_000000000000000000000000", headers=auth),  # 404
        await hl.client.post("/v1/tasks", json={"prompt": "x"}, headers=auth),  # 422
        await hl.client.post("/v1/tasks", content=b"{", headers=auth),  # 400
        await hl.client.post(
            "/v1/tasks", content=b"x", headers={**auth, "Content-Type": "text/plain"}
        ),  # 415
        await hl.client.post(f"/v1/callbacks/sim/{task_id}", params={"token": "no"}, json={}),
        await hl.client.post(  # 422: a model the catalogue does not offer
            "/v1/tasks",
            json={"inputs": [{"upload": upload.json()["key"]}], "prompt": "x", "model": "a/b"},
            headers=auth,
        ),
    ]
    assert [r.status_code for r in errors] == [401, 404, 422, 400, 415, 401, 422]
    for response in errors:
        assert_conforms(doc, "Error", response)


def test_the_30_rendition_is_mechanical() -> None:
    """Each 3.1-only construct becomes its 3.0 equivalent."""
    to_30 = openapi30.schema_to_30
    assert to_30({"type": ["string", "null"]}) == {"type": "string", "nullable": True}
    assert to_30({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]}) == {
        "nullable": True,
        "type": "integer",
        "minimum": 1,
    }
    assert to_30({"anyOf": [{"$ref": "#/components/schemas/E"}, {"type": "null"}]}) == {
        "nullable": True,
        "allOf": [{"$ref": "#/components/schemas/E"}],
    }
    assert to_30({"const": "ok"}) == {"enum": ["ok"]}
    assert to_30({"type": "string", "examples": ["a", "b"]}) == {"type": "string", "example": "a"}
    assert to_30({"type": "number", "exclusiveMinimum": 0}) == {
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
    }
    assert to_30(
        {"type": "object", "patternProperties": {"^a": {"type": "integer"}}, "$comment": "x"}
    ) == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert to_30({"properties": {"a": {"type": ["integer", "null"]}}}) == {
        "properties": {"a": {"type": "integer", "nullable": True}}
    }
    # pure: the 3.1 original is left as it was
    original = {"properties": {"a": {"type": ["integer", "null"], "const": 1}}}
    assert to_30(original) and original == {
        "properties": {"a": {"type": ["integer", "null"], "const": 1}}
    }
    doc = {"openapi": "3.1.0", "paths": {}, "components": {"schemas": {"A": original}}}
    assert openapi30.to_openapi_30(doc)["openapi"] == "3.0.3" and doc["openapi"] == "3.1.0"
    assert doc["components"]["schemas"]["A"] is original


async def test_the_30_rendition_has_no_31_constructs_left(hl: Hookline) -> None:
    doc30 = await document(hl, "/openapi-3.0.json")
    doc31 = await document(hl)
    assert operations(doc30) == operations(doc31)
    assert set(doc30["components"]["schemas"]) == set(doc31["components"]["schemas"])

    def walk(node: Any, in_schema: bool) -> None:
        if isinstance(node, dict):
            if in_schema:
                assert not isinstance(node.get("type"), list), node
                assert node.get("type") != "null", node
                assert not set(node) & openapi30.DROPPED_IN_30, node
            for key, value in node.items():
                walk(value, in_schema or key in ("schema", "schemas"))
        elif isinstance(node, list):
            for item in node:
                walk(item, in_schema)

    walk(doc30, in_schema=False)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium")
async def test_docs_render_every_operation_in_chromium(tmp_path: Path) -> None:
    """/docs in headless Chromium: Swagger UI lists every operation of the document, loads
    nothing from elsewhere and breaks no CSP rule. Screenshot: tests/artifacts/docs.png."""
    async with running_hookline(tmp_path) as hl, chromium(tmp_path) as cdp:
        doc = await document(hl)
        page = await hl.client.get("/docs")
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        await cdp.call("Page.enable")
        await cdp.call("Log.enable")
        await cdp.call("Runtime.enable")
        await cdp.call("Network.enable")
        await cdp.call("Page.navigate", url=hl.base_url + "/docs")
        count = len(operations(doc))
        await cdp.until(f"document.querySelectorAll('.opblock').length === {count}")
        shown = await cdp.js(
            "[...document.querySelectorAll('.opblock-summary')].map(e => "
            "e.querySelector('.opblock-summary-method').textContent + ' ' + "
            "e.querySelector('.opblock-summary-path').getAttribute('data-path'))"
        )
        assert {tuple(s.split(" ", 1)[::-1]) for s in shown} == operations(doc)
        assert await cdp.js("document.querySelector('.title').textContent.startsWith('hookline')")
        assert not await cdp.js("!!document.querySelector('.errors-wrapper')")

        shot = await cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "docs.png").write_bytes(base64.b64decode(shot["data"]))

        urls = [
            e["params"]["request"]["url"]
            for e in cdp.events
            if e["method"] == "Network.requestWillBeSent"
        ]
        assert urls and all(u.startswith((hl.base_url, "data:")) for u in urls), urls
        messages = [
            e["params"]["entry"]["text"] for e in cdp.events if e["method"] == "Log.entryAdded"
        ]
        assert not [m for m in messages if "Content Security Policy" in m], messages
        exceptions = [e for e in cdp.events if e["method"] == "Runtime.exceptionThrown"]
        assert not exceptions, exceptions


def readme_block(language: str) -> str:
    """The first ``language`` code block of README.md's "Integrating" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Integrating", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match is not None, language
    return match.group(1)


async def test_the_readme_python_client_creates_and_follows_a_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README "Integrating", the Python block as written, against a real server."""
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice", credits=100)
        (tmp_path / "photo.jpg").write_bytes(jpeg())
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("HOOKLINE_URL", hl.base_url)
        monkeypatch.setenv("HOOKLINE_API_KEY", key)
        await asyncio.to_thread(exec, readme_block("python"), {})
        lines = capsys.readouterr().out.splitlines()
        assert lines[-2] == "completed" and lines[-1].startswith("completed ['http")
        assert "pending" in lines or "processing" in lines or "ai_processing" in lines


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
async def test_the_readme_javascript_client_creates_and_follows_a_task(tmp_path: Path) -> None:
    """README "Integrating", the JavaScript block under Node.js (fetch, streams, crypto are the
    browser's APIs there too), against a real server."""
    assert NODE is not None
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice", credits=100)
        (tmp_path / "photo.jpg").write_bytes(jpeg())
        photo = json.dumps(str(tmp_path / "photo.jpg"))
        code = readme_block("js").replace('"http://127.0.0.1:8000"', json.dumps(hl.base_url))
        script = (
            'import { readFileSync } from "node:fs";\n'
            f"const apiKey = {json.dumps(key)};\n"
            f"const imageBlob = new Blob([readFileSync({photo})]);\n"
            f"{code}\nconsole.log(`final ${{final.state}} ${{final.outputs.length}}`);\n"
        )
        proc = await asyncio.create_subprocess_exec(
            NODE,
            "--input-type=module",
            "-e",
            script,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert lines[-2:] == ["completed", "final completed 1"], lines
