"""The layout is the architecture: who may import whom, checked on every module of the tree.

Each module of statemachine/, callbacks/ and service/ is parsed with ``ast`` and every import in
it is collected — at the top, inside functions, under ``if TYPE_CHECKING:`` — with relative imports
resolved against the module's package. A rule is data (``Rule``): which modules, which imports they
may not make, which modules are exempt. Each rule has a test on the real tree, and a test that a
fake module breaking it is reported (and one keeping it is not), so a checker that looked at
nothing cannot pass for one that looked and found nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import callbacks.errors
import statemachine.errors

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("statemachine", "callbacks", "service")
HTTP_LIBRARIES = (
    "httpx",
    "aiohttp",
    "httpx_aiohttp",
    "starlette",
    "uvicorn",
    "sse_starlette",
    "prometheus_client",
)
INNER_ROOMS = ("service.steps", "service.media", "service.blobs", "service.ops", "service.outbound")
ERROR_MODULES = ("statemachine.errors", "callbacks.errors")


# -- the checker ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Module:
    name: str  # dotted: "service.http.app"
    path: str  # from the repository's root: "service/http/app.py"
    source: str

    @property
    def is_package(self) -> bool:
        return self.path.endswith("__init__.py")


@dataclass(frozen=True, slots=True)
class Import:
    module: Module
    line: int
    target: str  # the dotted name imported: "service.http.errors.MalformedRequest"
    statement: str  # as written: "from service.http.errors import MalformedRequest"

    def __str__(self) -> str:
        return f"{self.module.path}:{self.line}: {self.statement}"


def module_at(path: Path) -> Module:
    relative = path.relative_to(ROOT)
    parts = relative.with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return Module(name, relative.as_posix(), path.read_text(encoding="utf-8"))


@functools.cache
def tree() -> tuple[Module, ...]:
    """Every module of the three packages."""
    return tuple(module_at(p) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")))


def absolute(module: Module, name: str | None, level: int) -> str:
    """The absolute name of ``from <level dots><name> import …`` written in ``module``."""
    if level == 0:
        assert name is not None
        return name
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if level - 1 >= len(package):
        raise ValueError(f"{module.path}: relative import beyond the top-level package")
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports(module: Module) -> list[Import]:
    """Every import anywhere in ``module`` (``ast.walk`` enters functions, classes and ifs)."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(module.source, module.path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node.module, node.level)
            targets = [base if a.name == "*" else f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [Import(module, node.lineno, t, ast.unparse(node)) for t in targets]
    return sorted(found, key=lambda i: (i.line, i.target))


def matches(name: str, pattern: str) -> bool:
    """Whether dotted ``name`` is ``pattern`` or inside it: ``service.http.errors.X`` matches
    ``service.http``, ``statemachine.sqlite_store`` matches ``statemachine.sqlite_*``."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:n]), pattern) for n in range(1, len(parts) + 1))


@dataclass(frozen=True, slots=True)
class Rule:
    """Modules matching ``modules`` (and no ``exempt``) import nothing matching ``forbidden``."""

    why: str
    modules: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()

    def applies_to(self, module: Module) -> bool:
        def any_of(patterns: tuple[str, ...]) -> bool:
            return any(matches(module.name, p) for p in patterns)

        return any_of(self.modules) and not any_of(self.exempt)

    def violations(self, modules: Iterable[Module]) -> list[Import]:
        return [
            found
            for module in modules
            if self.applies_to(module)
            for found in imports(module)
            if any(matches(found.target, p) for p in self.forbidden)
        ]


def assert_kept(rule: Rule) -> None:
    found = rule.violations(tree())
    assert not found, f"{rule.why}; broken by:\n" + "\n".join(f"  {v}" for v in found)


def fake(name: str, source: str, *, package: bool = False) -> Module:
    path = name.replace(".", "/") + ("/__init__.py" if package else ".py")
    return Module(name, path, textwrap.dedent(source).lstrip())


def reported(rule: Rule, *modules: Module) -> list[str]:
    return [str(v) for v in rule.violations(modules)]


# -- the rules -----------------------------------------------------------------------------------

STATEMACHINE_DECIDES = Rule(
    "statemachine/ decides: it imports nothing of callbacks/ or service/ and no HTTP library",
    modules=("statemachine",),
    forbidden=("callbacks", "service", *HTTP_LIBRARIES),
)
CALLBACKS_BELOW_SERVICE = Rule(
    "callbacks/ talks to providers and imports nothing of service/",
    modules=("callbacks",),
    forbidden=("service",),
)
FEED_AND_PORTS_ARE_GENERIC = Rule(
    "the generic feed and the ports import no store adapter",
    modules=("statemachine.feed", "statemachine.store"),
    forbidden=("statemachine.sqlite_*", "statemachine.mongo_*"),
)
HTTP_ON_TOP = Rule(
    "only service/http/ (and service/cli.py, which starts the app) imports service.http",
    modules=PACKAGES,
    forbidden=("service.http",),
    exempt=("service.http", "service.cli"),
)
INNER_ROOMS_SPEAK_NO_HTTP = Rule(
    "service/steps, media, blobs and ops import no web framework or server",
    modules=INNER_ROOMS,
    forbidden=("starlette", "uvicorn"),
)
RUNTIME_BUILDS_THE_ROOMS = Rule(
    "service/steps, media, blobs and ops do not import service.runtime: it builds them",
    modules=INNER_ROOMS,
    forbidden=("service.runtime",),
)


def test_statemachine_imports_no_callbacks_service_or_http_library() -> None:
    assert_kept(STATEMACHINE_DECIDES)


def test_callbacks_import_nothing_of_service() -> None:
    assert_kept(CALLBACKS_BELOW_SERVICE)


def test_the_feed_and_the_ports_import_no_adapter() -> None:
    assert_kept(FEED_AND_PORTS_ARE_GENERIC)


def test_only_the_http_layer_and_the_cli_import_service_http() -> None:
    assert_kept(HTTP_ON_TOP)


def test_inner_rooms_import_no_starlette_or_uvicorn() -> None:
    assert_kept(INNER_ROOMS_SPEAK_NO_HTTP)


def test_inner_rooms_do_not_import_the_runtime() -> None:
    assert_kept(RUNTIME_BUILDS_THE_ROOMS)


# -- the checker reports what breaks each rule ---------------------------------------------------


def test_the_walk_sees_the_whole_tree_and_the_cli_needs_its_exemption() -> None:
    names = {m.name for m in tree()}
    assert {"statemachine.errors", "callbacks.receiver", "service.http.app", "service"} <= names
    without_exemption = dataclasses.replace(HTTP_ON_TOP, exempt=("service.http",))
    found = without_exemption.violations(tree())
    assert found and {v.module.path for v in found} == {"service/cli.py"}


def test_statemachine_rule_reports_imports_in_functions_and_under_type_checking() -> None:
    module = fake(
        "statemachine.fake",
        """
        from typing import TYPE_CHECKING

        from statemachine import clock

        if TYPE_CHECKING:
            from service.settings import Settings

        def fetch() -> None:
            import httpx.transports

        class Later:
            def send(self) -> None:
                from callbacks.errors import ProviderError
                from prometheus_client import Counter
        """,
    )
    assert reported(STATEMACHINE_DECIDES, module) == [
        "statemachine/fake.py:6: from service.settings import Settings",
        "statemachine/fake.py:9: import httpx.transports",
        "statemachine/fake.py:13: from callbacks.errors import ProviderError",
        "statemachine/fake.py:14: from prometheus_client import Counter",
    ]


def test_callbacks_rule_reports_an_import_of_service() -> None:
    module = fake(
        "callbacks.fake",
        """
        from callbacks.errors import WebhookRejected
        from statemachine.errors import NotFound
        import service.settings
        """,
    )
    assert reported(CALLBACKS_BELOW_SERVICE, module) == [
        "callbacks/fake.py:3: import service.settings"
    ]


def test_feed_rule_reports_an_adapter_imported_by_the_feed_or_a_port() -> None:
    feed = fake("statemachine.feed", "from statemachine.sqlite_feed import SqliteFeed\n")
    store = fake("statemachine.store", "from . import mongo_store\nfrom .task import Task\n")
    sqlite_feed = fake("statemachine.sqlite_feed", "from statemachine.sqlite_store import X\n")
    assert reported(FEED_AND_PORTS_ARE_GENERIC, feed, store, sqlite_feed) == [
        "statemachine/feed.py:1: from statemachine.sqlite_feed import SqliteFeed",
        "statemachine/store.py:1: from . import mongo_store",
    ]


def test_http_rule_reports_relative_and_package_imports_of_service_http() -> None:
    step = fake("service.steps.fake", "from ..http import errors\nfrom . import runner\n")
    room = fake("service.media", "from .. import http\n", package=True)
    settings = fake("service.settings", "from service.http.errors import http_status\n")
    route = fake("service.http.fake", "from service.http.errors import http_status\n")
    cli = fake("service.cli", "from service.http.app import create_app\n")
    assert reported(HTTP_ON_TOP, step, room, settings, route, cli) == [
        "service/steps/fake.py:1: from ..http import errors",
        "service/media/__init__.py:1: from .. import http",
        "service/settings.py:1: from service.http.errors import http_status",
    ]


def test_inner_rooms_rule_reports_starlette_and_uvicorn() -> None:
    blobs = fake("service.blobs.fake", "import starlette.responses\nimport httpx\n")
    ops = fake("service.ops.fake", "def serve() -> None:\n    from uvicorn import Server\n")
    http = fake("service.http.fake", "import starlette\n")
    assert reported(INNER_ROOMS_SPEAK_NO_HTTP, blobs, ops, http) == [
        "service/blobs/fake.py:1: import starlette.responses",
        "service/ops/fake.py:2: from uvicorn import Server",
    ]


def test_runtime_rule_reports_an_inner_room_importing_the_runtime() -> None:
    steps = fake("service.steps.fake", "from service.runtime import Runtime\n")
    media = fake("service.media.fake", "from ..settings import Settings\nfrom .. import runtime\n")
    http = fake("service.http.fake", "from service.runtime import Runtime\n")
    assert reported(RUNTIME_BUILDS_THE_ROOMS, steps, media, http) == [
        "service/steps/fake.py:1: from service.runtime import Runtime",
        "service/media/fake.py:2: from .. import runtime",
    ]


# -- no HTTP statuses in the domain's and the providers' errors ----------------------------------


def http_numbers(module: Module) -> list[str]:
    """Where ``module`` names an HTTP status: a ``status`` attribute assigned (in a class body or
    on ``self``), or an integer literal from 100 to 599 in its code (docstrings may say "429")."""
    found: list[str] = []
    for node in ast.walk(ast.parse(module.source, module.path)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            named = target.id if isinstance(target, ast.Name) else None
            named = target.attr if isinstance(target, ast.Attribute) else named
            if named == "status":
                found.append(f"{module.path}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Constant) and type(node.value) is int and 100 <= node.value <= 599:
            found.append(f"{module.path}:{node.lineno}: {node.value}")
    return sorted(set(found), key=lambda hit: (int(hit.split(":")[1]), hit))


def test_the_domain_and_provider_errors_carry_no_http_status() -> None:
    """Statuses are the HTTP layer's (service/http/errors.py), not an attribute of the errors."""
    modules = [m for m in tree() if m.name in ERROR_MODULES]
    assert len(modules) == len(ERROR_MODULES)
    found = [hit for m in modules for hit in http_numbers(m)]
    assert not found, "HTTP statuses in an errors module:\n" + "\n".join(found)
    for namespace in (statemachine.errors, callbacks.errors):
        classes = [
            cls
            for _, cls in inspect.getmembers(namespace, inspect.isclass)
            if cls.__module__ == namespace.__name__
        ]
        assert classes
        with_status = [cls.__qualname__ for cls in classes if hasattr(cls, "status")]
        assert not with_status, f"{namespace.__name__}: classes with a status: {with_status}"


def test_status_check_reports_class_attributes_assignments_and_literals() -> None:
    module = fake(
        "callbacks.errors",
        '''
        """Provider errors: the provider's 429 is retried."""

        class ProviderError(HooklineError):
            code = "provider_error"
            status = 502

        class WebhookRejected(ProviderError):
            status: int = 401

            def __init__(self, message: str) -> None:
                super().__init__(message)
                self.status = 400
                self.retry_after_s = 30

        STATUS_BY_CODE = {"malformed_body": 400}
        ''',
    )
    assert http_numbers(module) == [
        "callbacks/errors.py:5: 502",
        "callbacks/errors.py:5: status = 502",
        "callbacks/errors.py:8: 401",
        "callbacks/errors.py:8: status: int = 401",
        "callbacks/errors.py:12: 400",
        "callbacks/errors.py:12: self.status = 400",
        "callbacks/errors.py:15: 400",
    ]
