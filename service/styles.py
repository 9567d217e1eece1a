"""The style catalogue: prompt template, provider and model, parameters, cost and fallbacks."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statemachine.errors import BadRequest

DEFAULT_STYLES = Path(__file__).with_name("styles.toml")
DEFAULT_COST = 5  # credits for a task without a style


@dataclass(frozen=True, slots=True)
class Style:
    name: str
    prompt_template: str
    cost: int
    description: str = ""
    negative_prompt: str | None = None
    provider: str = "default"
    model: str = "default"
    params: dict[str, Any] = field(default_factory=dict)
    fallbacks: tuple[str, ...] = ()

    def render(self, prompt: str) -> str:
        """The provider prompt: the user's prompt placed in the template."""
        return self.prompt_template.replace("{prompt}", prompt)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "prompt_template": self.prompt_template,
            "negative_prompt": self.negative_prompt,
            "provider": self.provider,
            "model": self.model,
            "params": self.params,
            "cost": self.cost,
            "fallbacks": list(self.fallbacks),
        }


PLAIN = Style(name="plain", prompt_template="{prompt}", cost=DEFAULT_COST)


class Catalogue:
    """Styles by name, loaded from TOML."""

    def __init__(self, styles: dict[str, Style]) -> None:
        self._styles = styles

    @classmethod
    def load(cls, path: Path | None = None) -> Catalogue:
        with (path or DEFAULT_STYLES).open("rb") as f:
            raw = tomllib.load(f)
        styles: dict[str, Style] = {}
        for name, spec in raw.get("styles", {}).items():
            cost = int(spec["cost"])
            if cost < 0:
                raise ValueError(f"style {name}: cost must be >= 0")
            styles[name] = Style(
                name=name,
                prompt_template=str(spec["prompt_template"]),
                cost=cost,
                description=str(spec.get("description", "")),
                negative_prompt=spec.get("negative_prompt"),
                provider=str(spec.get("provider", "default")),
                model=str(spec.get("model", "default")),
                params=dict(spec.get("params", {})),
                fallbacks=tuple(spec.get("fallbacks", ())),
            )
        return cls(styles)

    def get(self, name: str | None) -> Style:
        """The named style (``PLAIN`` for None); ``BadRequest`` for an unknown name."""
        if name is None:
            return PLAIN
        try:
            return self._styles[name]
        except KeyError:
            raise BadRequest(
                f"unknown style {name!r}", code="unknown_style", details=sorted(self._styles)
            ) from None

    def all(self) -> list[Style]:
        return list(self._styles.values())
