"""The configuration reference, generated from the config classes so it cannot drift from them.

p2pfed config reference > docs/CONFIG.md
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from p2pfed.config import Config, Profile

__all__ = ["reference_markdown"]


_LIMITS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="), ("pattern", "matches"))


def _type_name(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("Literal", "one of ").replace("NoneType", "None").replace(" | ", " or ")


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue
        limits = ", ".join(
            f"{symbol} {getattr(m, attr)}"
            for m in field.metadata
            for attr, symbol in _LIMITS
            if getattr(m, attr, None) is not None
        )
        desc = (field.description or "").replace("|", "\\|")
        default = _default(field)
        rows.append(
            f"| `{prefix}{name}` | {_type_name(field)} | `{default!r}` | {desc}{f' ({limits})' if limits else ''} |"
        )
    return rows


def reference_markdown() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from `p2pfed/config.py` by `p2pfed config reference`. A run config (`configs/*.yaml`) sets any of",
        "these; `--set KEY=VALUE` overrides one by its dotted key. Unknown keys are rejected.",
        "",
    ]
    for section, field in Config.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        out += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += _rows(model, f"{section}.")
        out.append("")
    out += [
        "## Peer profile (`peers/*.yaml`, `--profile`)",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    out += _rows(Profile, "")
    return "\n".join(out) + "\n"
