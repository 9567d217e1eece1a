"""The operator's catalogue (service/styles.toml, or ``HOOKLINE_STYLES_PATH``): what may run and
what it costs.

    [providers.replicate]                  # a provider users may choose, and the models they
    models = ["black-forest-labs/flux-dev"]  # may choose on it (its default model always runs)

    [plain]                                # the task without a style (same keys as a style)
    cost = 5                               # credits per output

    [styles.anime]
    prompt_template = "anime illustration, {prompt}"
    params = { width = 1024, height = 1024 }   # sent to the model unless the user sets them
    providers = ["sim"]                    # replaces [providers] for this style
    models = { sim = ["hookline/sim"] }    # replaces a provider's models for this style
    [styles.anime.price]                   # instead of ``cost``: base + per output
    base = 0
    sizes = [{ max_pixels = 1048576, per_output = 8 }, { max_pixels = 4194304, per_output = 20 }]
    [styles.anime.user_params]             # what a user may set, and to what
    width = { min = 256, max = 2048 }
    steps = { min = 1, max = 50, surcharges = [{ above = 30, per_output = 2 }] }
    quality = { choices = ["standard", "hd"], prices = { hd = 4 } }

The price of a task is ``base + num_outputs × per_output``, where ``per_output`` is the flat
price or the first size tier whose ``max_pixels`` covers ``width × height``, plus each
param's surcharge (the value's entry in ``prices``, the highest ``surcharges`` threshold the
value is above). Prices are computed over the task's effective params (the style's, then the
user's), so a stored task's cost can be recomputed from it.

Admins may run any configured provider and model; params are checked for everyone. Keys that
steer where inputs, outputs or callbacks go (``steers_io``) can never be user params: a catalogue
that lists one, or anything else it cannot honour, fails to load with a ``CatalogueError``.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from callbacks.http import IMAGE_KEY_PARAM, IMAGES_KEY_PARAM
from statemachine.errors import BadRequest

DEFAULT_STYLES = Path(__file__).with_name("styles.toml")
DEFAULT_COST = 5  # credits per output of a task without a style, when the catalogue has no [plain]
DEFAULT_MAX_LENGTH = 200  # characters of a string param without its own max_length

ParamValue: TypeAlias = str | int | float | bool
ParamType = Literal["integer", "number", "boolean", "string"]

# What the adapters set themselves (callbacks/http.py ``model_input``, the Replicate, fal and BFL
# bodies): the prompt, the output count, the callback, the input images and where they go.
RESERVED_PARAMS: Final = frozenset(
    [
        "prompt",
        "negative_prompt",
        "num_outputs",
        "num_images",
        "n",
        "image",
        "images",
        "image_prompt",
        "mask",
        "model",
        "version",
        "input",
        "stream",
        "sync_mode",
    ]
) | {IMAGE_KEY_PARAM, IMAGES_KEY_PARAM}
_RESERVED_PARTS: Final = ("webhook", "callback", "url", "uri")
# Operators may steer where the input image goes (a style's own ``params``); users never.
OPERATOR_KNOBS: Final = frozenset({IMAGE_KEY_PARAM, IMAGES_KEY_PARAM})


def steers_io(name: str) -> bool:
    """Whether a param names an input, an output or a callback: a reserved key, any key with
    "webhook", "callback", "url" or "uri" in it, and input-image keys (``*image``, ``*images``,
    ``input_image*``, ``image_prompt*``)."""
    key = name.lower()
    return (
        key in RESERVED_PARAMS
        or any(part in key for part in _RESERVED_PARTS)
        or key.endswith(("image", "images"))
        or key.startswith(("input_image", "image_prompt"))
    )


class CatalogueError(ValueError):
    """A catalogue that cannot be loaded; the message names the file, the table and the key."""


# -- the rules -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Surcharge:
    """Credits per output added when a numeric param is above ``above``."""

    above: float
    per_output: int


@dataclass(frozen=True, slots=True)
class ParamRule:
    """What a user may set one param to, and what a value adds to the price per output."""

    type: ParamType
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[ParamValue, ...] = ()
    max_length: int | None = None
    prices: Mapping[str, int] = field(default_factory=dict)  # choice label → per output
    surcharges: tuple[Surcharge, ...] = ()  # ascending by ``above``

    def problem(self, value: ParamValue) -> str | None:
        """Why ``value`` is refused (a phrase: "must be …"), or None."""
        if not _of_type(value, self.type):
            return _TYPE_PROBLEMS[self.type]
        if self.choices:
            if any(_same(value, c) for c in self.choices):
                return None
            return f"must be one of {list(self.choices)}"
        if isinstance(value, str):
            limit = self.max_length or DEFAULT_MAX_LENGTH
            return None if len(value) <= limit else f"must be at most {limit} characters"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None and not low <= value <= high:
            return f"must be from {_number(low)} to {_number(high)}"
        return None

    def surcharge(self, value: ParamValue) -> int:
        """Credits per output ``value`` adds."""
        if self.prices:
            return self.prices.get(label(value), 0)
        added = 0
        if not isinstance(value, bool) and isinstance(value, int | float):
            for step in self.surcharges:
                if value > step.above:
                    added = step.per_output
        return added

    def largest(self) -> float | None:
        """The largest value a user may give (numbers only)."""
        numbers = [float(c) for c in self.choices if _is_number(c)]
        return max(numbers) if numbers else self.maximum


@dataclass(frozen=True, slots=True)
class SizeTier:
    """The price per output of outputs up to ``max_pixels`` (``width × height``)."""

    max_pixels: int
    per_output: int


@dataclass(frozen=True, slots=True)
class Price:
    """``base + num_outputs × per_output``; ``per_output`` is flat, or by size (``sizes``)."""

    base: int = 0
    per_output: int | None = DEFAULT_COST
    sizes: tuple[SizeTier, ...] = ()  # ascending; set exactly when ``per_output`` is None

    def per_output_at(self, params: Mapping[str, Any]) -> int:
        if self.per_output is not None:
            return self.per_output
        pixels = int(params["width"]) * int(params["height"])
        for tier in self.sizes:
            if pixels <= tier.max_pixels:
                return tier.per_output
        raise BadRequest(f"no price for {pixels} pixels", code="size_not_priced")


@dataclass(frozen=True, slots=True)
class ProviderRule:
    """A provider users may choose, and the models they may choose on it besides its default."""

    name: str
    models: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Style:
    name: str
    prompt_template: str
    price: Price = field(default_factory=Price)
    description: str = ""
    negative_prompt: str | None = None
    provider: str = "default"
    model: str = "default"
    params: dict[str, Any] = field(default_factory=dict)  # the defaults sent to the model
    user_params: Mapping[str, ParamRule] = field(default_factory=dict)
    providers: tuple[str, ...] | None = None  # None: the catalogue's [providers]
    models: Mapping[str, frozenset[str]] = field(default_factory=dict)  # replaces [providers]
    fallbacks: tuple[str, ...] = ()

    def render(self, prompt: str) -> str:
        """The provider prompt: the user's prompt placed in the template."""
        return self.prompt_template.replace("{prompt}", prompt)

    def check_params(self, params: Mapping[str, ParamValue]) -> None:
        """Refuse (``BadRequest``) the first user param, by name, that may not be set so."""
        for name in sorted(params):
            if steers_io(name):
                raise BadRequest(
                    f"param {name!r} is set by hookline itself and cannot be given",
                    code="reserved_param",
                    details={"param": name},
                )
            rule = self.user_params.get(name)
            if rule is None:
                raise BadRequest(
                    f"param {name!r} is not one style {self.name!r} lets you set",
                    code="param_not_allowed",
                    details={"param": name, "allowed": sorted(self.user_params)},
                )
            problem = rule.problem(params[name])
            if problem is not None:
                raise BadRequest(
                    f"param {name!r} {problem}",
                    code="bad_param_value",
                    details={"param": name, "problem": problem},
                )

    def cost_of(self, num_outputs: int, params: Mapping[str, Any]) -> int:
        """The price of ``num_outputs`` outputs with these effective params (defaults included)."""
        per_output = self.price.per_output_at(params)
        for name, rule in self.user_params.items():
            if name in params:
                per_output += rule.surcharge(params[name])
        return self.price.base + num_outputs * per_output

    @property
    def cost(self) -> int:
        """The price of one output at the style's own params: what the simplest task costs."""
        return self.cost_of(1, self.params)


PLAIN = Style(name="plain", prompt_template="{prompt}")


class Catalogue:
    """Styles by name, the plain default, and the providers users may choose."""

    def __init__(
        self,
        styles: dict[str, Style],
        plain: Style = PLAIN,
        providers: dict[str, ProviderRule] | None = None,
    ) -> None:
        self._styles = styles
        self.plain = plain
        # public and mutable like ``Runtime.providers``: code that registers a provider at run
        # time may make it choosable too
        self.providers: dict[str, ProviderRule] = providers or {}

    @classmethod
    def load(cls, path: Path | None = None) -> Catalogue:
        path = path or DEFAULT_STYLES
        with path.open("rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise CatalogueError(f"{path}: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "catalogue") -> Catalogue:
        """The catalogue a parsed TOML document describes; ``CatalogueError`` naming the key."""
        _known(raw, {"styles", "plain", "providers"}, source)
        providers = {}
        for name, spec in _tables(raw, "providers", source).items():
            where = f"{source}: [providers.{name}]"
            _known(spec, {"models"}, where)
            providers[name] = ProviderRule(name, frozenset(_strings(spec, "models", where)))
        plain_spec = dict(_table(raw.get("plain", {"cost": DEFAULT_COST}), f"{source}: [plain]"))
        plain_spec.setdefault("prompt_template", "{prompt}")
        plain = _style("plain", plain_spec, f"{source}: [plain]")
        styles = {
            name: _style(name, spec, f"{source}: [styles.{name}]")
            for name, spec in _tables(raw, "styles", source).items()
        }
        return cls(styles, plain, providers)

    def get(self, name: str | None) -> Style:
        """The named style (the plain one for None); ``BadRequest`` for an unknown name."""
        if name is None:
            return self.plain
        try:
            return self._styles[name]
        except KeyError:
            raise BadRequest(
                f"unknown style {name!r}", code="unknown_style", details=sorted(self._styles)
            ) from None

    def all(self) -> list[Style]:
        return list(self._styles.values())

    def providers_for(self, style: Style) -> frozenset[str]:
        """The providers a user may choose for ``style`` (besides the one it runs on)."""
        return frozenset(self.providers if style.providers is None else style.providers)

    def models_for(self, style: Style, provider: str) -> frozenset[str]:
        """The models a user may choose on ``provider`` for ``style`` (besides the default)."""
        if provider in style.models:
            return style.models[provider]
        rule = self.providers.get(provider)
        return rule.models if rule else frozenset()

    def choices(
        self,
        style: Style,
        default_provider: str,
        default_model: Callable[[str], str],
        configured: Collection[str],
    ) -> dict[str, list[str]]:
        """Provider → models a user may run ``style`` on, among the configured providers: the
        one it runs on first, and first in each list the model that runs when none is named."""
        home = style.provider if style.provider != "default" else default_provider
        names = [home, *sorted(self.providers_for(style) - {home})]
        out: dict[str, list[str]] = {}
        for name in names:
            if name in configured:
                standard = _standard_model(style, name, home, default_model)
                out[name] = [standard, *sorted(self.models_for(style, name) - {standard})]
        return out

    def choose(
        self,
        style: Style,
        *,
        provider: str | None,
        model: str | None,
        default_provider: str,
        default_model: Callable[[str], str],
        configured: Collection[str],
        admin: bool,
    ) -> tuple[str, str]:
        """The provider and model a task runs on: what the request names, else the style's,
        else the defaults. ``BadRequest`` for a provider that is not configured
        (``unknown_provider``) and, unless ``admin``, for a provider or model the catalogue does
        not offer (``provider_not_allowed``, ``model_not_allowed``)."""
        home = style.provider if style.provider != "default" else default_provider
        chosen = provider or home
        offered = self.choices(style, default_provider, default_model, configured)
        if chosen not in configured:
            shown = sorted(configured) if admin else list(offered)
            raise BadRequest(f"unknown provider {chosen!r}", code="unknown_provider", details=shown)
        if chosen not in offered and not admin:
            raise BadRequest(
                f"provider {chosen!r} is not offered for style {style.name!r}",
                code="provider_not_allowed",
                details=list(offered),
            )
        standard = _standard_model(style, chosen, home, default_model)
        run = model or standard
        if not admin and run not in offered[chosen]:
            raise BadRequest(
                f"model {run!r} is not offered on {chosen!r} for style {style.name!r}",
                code="model_not_allowed",
                details=offered[chosen],
            )
        return chosen, run


def _standard_model(
    style: Style, provider: str, home: str, default_model: Callable[[str], str]
) -> str:
    """The model that runs on ``provider`` when the request names none: the style's own on its
    own provider, else the provider's configured one."""
    if provider == home and style.model != "default":
        return style.model
    return default_model(provider)


_TYPE_PROBLEMS: Final[dict[ParamType, str]] = {
    "integer": "must be an integer",
    "number": "must be a number",
    "boolean": "must be true or false",
    "string": "must be a string",
}


def _of_type(value: Any, kind: ParamType) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return _is_number(value)


def _same(value: Any, choice: ParamValue) -> bool:
    """``value`` is ``choice``: equal, and both strings, both booleans or both numbers."""
    if isinstance(choice, bool) or isinstance(value, bool):
        return value is choice
    if isinstance(choice, str) or isinstance(value, str):
        return value == choice and isinstance(value, str) and isinstance(choice, str)
    return bool(value == choice)


def label(value: ParamValue) -> str:
    """How a choice is named in ``prices``: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# -- loading ---------------------------------------------------------------------------------------

_STYLE_KEYS: Final = frozenset(
    [
        "description",
        "prompt_template",
        "negative_prompt",
        "provider",
        "model",
        "params",
        "fallbacks",
        "cost",
        "price",
        "user_params",
        "providers",
        "models",
    ]
)
_RULE_KEYS: Final = frozenset(
    ["type", "min", "max", "choices", "max_length", "prices", "surcharges"]
)


def _table(spec: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(spec, Mapping):
        raise CatalogueError(f"{where}: must be a table")
    return spec


def _known(spec: Any, keys: Iterable[str], where: str) -> None:
    unknown = sorted(set(_table(spec, where)) - set(keys))
    if unknown:
        raise CatalogueError(f"{where}: unknown keys {unknown} (known: {sorted(keys)})")


def _tables(spec: Mapping[str, Any], key: str, where: str) -> dict[str, Mapping[str, Any]]:
    """The sub-tables of ``spec[key]`` by name (``[key.name]``)."""
    tables = _table(spec.get(key, {}), f"{where}: [{key}]")
    return {name: _table(t, f"{where}: [{key}.{name}]") for name, t in tables.items()}


def _strings(spec: Mapping[str, Any], key: str, where: str) -> list[str]:
    values = spec.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise CatalogueError(f"{where}: {key} must be a list of non-empty strings")
    return values


def _credits(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CatalogueError(f"{where}: must be a whole number of credits >= 0, not {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _style(name: str, spec: Mapping[str, Any], where: str) -> Style:
    _known(spec, _STYLE_KEYS, where)
    if not isinstance(spec.get("prompt_template"), str):
        raise CatalogueError(f"{where}: prompt_template must be a string")
    if not isinstance(spec.get("negative_prompt", ""), str):
        raise CatalogueError(f"{where}: negative_prompt must be a string")
    params = dict(_table(spec.get("params", {}), f"{where}: params"))
    for key, value in params.items():
        if steers_io(key) and key not in OPERATOR_KNOBS:
            raise CatalogueError(f"{where}: params.{key} is set by the adapter itself")
        if not isinstance(value, str | bool) and not _is_number(value):
            raise CatalogueError(f"{where}: params.{key} must be a string, number or boolean")
    rules = {
        key: _rule(rule, f"{where}: user_params.{key}")
        for key, rule in _table(spec.get("user_params", {}), f"{where}: user_params").items()
    }
    for key, rule in rules.items():
        if steers_io(key):
            raise CatalogueError(
                f"{where}: user_params.{key} steers where inputs, outputs or callbacks go; "
                "hookline sets it itself and no user may"
            )
        if key in params and (problem := rule.problem(params[key])) is not None:
            raise CatalogueError(f"{where}: params.{key} = {params[key]!r}, but it {problem}")
    models = _table(spec.get("models", {}), f"{where}: models")
    style = Style(
        name=name,
        prompt_template=spec["prompt_template"],
        price=_price(spec, where),
        description=str(spec.get("description", "")),
        negative_prompt=spec.get("negative_prompt"),
        provider=str(spec.get("provider", "default")),
        model=str(spec.get("model", "default")),
        params=params,
        user_params=rules,
        providers=tuple(_strings(spec, "providers", where)) if "providers" in spec else None,
        models={p: frozenset(_strings(models, p, f"{where}: models")) for p in models},
        fallbacks=tuple(_strings(spec, "fallbacks", where)),
    )
    if style.price.sizes:
        _check_sizes(style, where)
    return style


def _price(spec: Mapping[str, Any], where: str) -> Price:
    if ("cost" in spec) == ("price" in spec):
        raise CatalogueError(f"{where}: give either cost (credits per output) or a [price] table")
    if "cost" in spec:
        return Price(per_output=_credits(spec["cost"], f"{where}: cost"))
    price = spec["price"]
    _known(price, {"base", "per_output", "sizes"}, f"{where}: price")
    base = _credits(price.get("base", 0), f"{where}: price.base")
    if ("per_output" in price) == ("sizes" in price):
        raise CatalogueError(f"{where}: price needs either per_output or sizes")
    if "per_output" in price:
        return Price(base, _credits(price["per_output"], f"{where}: price.per_output"))
    tiers = price["sizes"]
    if not isinstance(tiers, list) or not tiers:
        raise CatalogueError(f"{where}: price.sizes must be a non-empty list of tables")
    sizes = []
    for i, tier in enumerate(tiers):
        at = f"{where}: price.sizes[{i}]"
        _known(tier, {"max_pixels", "per_output"}, at)
        pixels = tier.get("max_pixels")
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels <= 0:
            raise CatalogueError(f"{at}: max_pixels must be a positive integer")
        sizes.append(SizeTier(pixels, _credits(tier.get("per_output"), f"{at}: per_output")))
    if [t.max_pixels for t in sizes] != sorted({t.max_pixels for t in sizes}):
        raise CatalogueError(f"{where}: price.sizes must ascend by max_pixels")
    return Price(base, None, tuple(sizes))


def _check_sizes(style: Style, where: str) -> None:
    """A style priced by size has a size on every task, and no size it cannot price."""
    largest = 1.0
    for side in ("width", "height"):
        if not isinstance(style.params.get(side), int) or isinstance(style.params[side], bool):
            raise CatalogueError(f"{where}: a price by size needs an integer params.{side}")
        rule = style.user_params.get(side)
        if rule is not None and rule.type != "integer":
            raise CatalogueError(f"{where}: user_params.{side} must be an integer to be priced")
        largest *= style.params[side] if rule is None else (rule.largest() or 0)
    top = style.price.sizes[-1].max_pixels
    if largest > top:
        raise CatalogueError(
            f"{where}: the largest size users may ask for ({int(largest)} pixels) is above the "
            f"largest price.sizes tier ({top}); add a tier or lower user_params width/height"
        )


def _rule(spec: Any, where: str) -> ParamRule:
    _known(spec, _RULE_KEYS, where)
    choices = spec.get("choices", [])
    if not isinstance(choices, list) or not all(
        isinstance(c, str | bool) or _is_number(c) for c in choices
    ):
        raise CatalogueError(f"{where}: choices must be a list of strings, numbers or booleans")
    kind = spec.get("type") or _inferred_type(spec, choices, where)
    if kind not in ("integer", "number", "boolean", "string"):
        raise CatalogueError(f"{where}: type must be integer, number, boolean or string")
    ranged = kind in ("integer", "number") and not choices
    bounds = [spec.get("min"), spec.get("max")]
    if ranged and not all(_is_number(b) for b in bounds):
        raise CatalogueError(f"{where}: a {kind} param needs min and max (or choices)")
    if ranged and bounds[0] > bounds[1]:
        raise CatalogueError(f"{where}: min is above max")
    if not ranged and ("min" in spec or "max" in spec):
        raise CatalogueError(f"{where}: min and max are for integer and number params")
    rule = ParamRule(
        type=kind,
        minimum=bounds[0] if ranged else None,
        maximum=bounds[1] if ranged else None,
        choices=tuple(choices),
        max_length=_max_length(spec, kind, where),
        prices=_choice_prices(spec, choices, where),
        surcharges=_surcharges(spec, ranged, where),
    )
    for choice in choices:
        if not _of_type(choice, kind):
            raise CatalogueError(f"{where}: choice {choice!r} is not a {kind}")
    return rule


def _inferred_type(spec: Mapping[str, Any], choices: list[Any], where: str) -> ParamType:
    values = choices or [spec[k] for k in ("min", "max") if k in spec]
    if values and all(isinstance(v, bool) for v in values):
        return "boolean"
    if values and all(isinstance(v, str) for v in values):
        return "string"
    if values and all(_is_number(v) for v in values):
        return "integer" if all(isinstance(v, int) for v in values) else "number"
    raise CatalogueError(f"{where}: give its type (integer, number, boolean or string)")


def _max_length(spec: Mapping[str, Any], kind: str, where: str) -> int | None:
    if "max_length" not in spec:
        return None
    value = spec["max_length"]
    if kind != "string" or isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CatalogueError(f"{where}: max_length must be a positive integer, for strings")
    return value


def _choice_prices(spec: Mapping[str, Any], choices: list[Any], where: str) -> dict[str, int]:
    prices = spec.get("prices", {})
    _known(prices, {label(c) for c in choices}, f"{where}: prices (by choice)")
    return {key: _credits(value, f"{where}: prices.{key}") for key, value in prices.items()}


def _surcharges(spec: Mapping[str, Any], ranged: bool, where: str) -> tuple[Surcharge, ...]:
    steps = spec.get("surcharges", [])
    if steps and not ranged:
        raise CatalogueError(f"{where}: surcharges are for integer and number ranges")
    if not isinstance(steps, list):
        raise CatalogueError(f"{where}: surcharges must be a list of tables")
    out = []
    for i, step in enumerate(steps):
        at = f"{where}: surcharges[{i}]"
        _known(step, {"above", "per_output"}, at)
        if not _is_number(step.get("above")):
            raise CatalogueError(f"{at}: above must be a number")
        out.append(Surcharge(step["above"], _credits(step.get("per_output"), f"{at}: per_output")))
    if [s.above for s in out] != sorted({s.above for s in out}):
        raise CatalogueError(f"{where}: surcharges must ascend by above")
    return tuple(out)
