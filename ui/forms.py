"""Config dataclasses -> Gradio components, and form values -> a validated `AdaptConfig`.

Every form in the workbench is derived from the fields of `ttrv.config.SECTIONS`: the
label is the field name, the info line its help text plus its allowed range, the
component follows the field type (Literal -> Dropdown/Radio, bool -> Checkbox, bounded
float -> Slider, other numbers -> Number, str -> Textbox). Nothing is copied field by
field, so a new config field shows up in the UI by itself.

Form values travel to handlers as keyword arguments named `<section>__<field>` (see
`form_kwargs`), which `config_from_values` turns back into an `AdaptConfig`. Here values
are only converted to the field's type (`ttrv.config.convert_value`); every bound is the
dataclass's (`AdaptConfig.from_dict` runs each `__post_init__`), so each rejection is the
same `ConfigError` message the CLI gives. Number components carry no min/max of their own
(Gradio would reject such a value with its own, less helpful, error before the handler
runs) and no precision: `precision=0` rounds 2.5 to 2 before the handler sees it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import gradio as gr

from ttrv.config import (
    SECTIONS,
    AdaptConfig,
    ConfigError,
    bounds_text,
    convert_value,
    field_choices,
    field_type,
)

SEP = "__"
# Sliders only for floats bounded on both sides within this span (a 1..4096 slider is
# useless); everything else numeric is a gr.Number.
SLIDER_MAX_SPAN = 1.0

Factory = Callable[[dataclasses.Field, dict[str, Any]], gr.components.Component]


def key(section: str, name: str) -> str:
    return f"{section}{SEP}{name}"


def label_of(name: str) -> str:
    return name.replace("_", " ")


def range_text(meta: dict[str, Any]) -> str:
    text = bounds_text(meta)
    return f" [{text}]" if text else ""


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # pragma: no cover - no such field yet
        return f.default_factory()
    return None


def field_component(
    section: str, f: dataclasses.Field, value: Any = None
) -> gr.components.Component:
    """The component for one config field (not rendered twice: call inside a Blocks)."""
    cls = SECTIONS[section]
    meta = dict(f.metadata)
    value = default_of(f) if value is None else value
    common = {
        "label": label_of(f.name),
        "info": meta.get("help", "") + range_text(meta),
        "elem_id": f"cfg-{section}-{f.name}",
    }
    choices = field_choices(cls, f.name)
    if choices is not None:
        if len(choices) <= 4:
            return gr.Radio(list(choices), value=value, **common)
        return gr.Dropdown(list(choices), value=value, **common)
    typ = field_type(cls, f.name)
    if typ is bool:
        return gr.Checkbox(value=bool(value), **common)
    if typ is int:
        return gr.Number(value=value, step=1, **common)
    if typ is float:
        lo, hi = meta.get("minimum"), meta.get("maximum")
        if lo is not None and hi is not None and hi - lo <= SLIDER_MAX_SPAN:
            return gr.Slider(lo, hi, value=value, step=0.01, **common)
        return gr.Number(value=value, step=_step(value), **common)
    return gr.Textbox(value="" if value is None else str(value), **common)


def _step(value: Any) -> float:
    """A spinner step at the default's decimal order (1e-4 for a 2e-4 learning rate)."""
    try:
        v = abs(float(value))
    except (TypeError, ValueError):
        return 0.1
    return 0.001 if v == 0 else min(1.0, 10.0 ** math.floor(math.log10(v)))


def build_section(
    section: str,
    *,
    exclude: Iterable[str] = (),
    only: Iterable[str] | None = None,
    overrides: dict[str, Factory] | None = None,
    columns: int = 2,
) -> dict[str, gr.components.Component]:
    """Render the fields of one config section (in rows of `columns`); {key: component}.

    `overrides[name](field, common)` builds a field's component itself (e.g. the model
    picker); it still gets the derived label/info/elem_id in `common`. `only` keeps just
    the named fields, `exclude` drops some.
    """
    overrides = overrides or {}
    skip = set(exclude)
    keep = None if only is None else set(only)
    fields = [f for f in dataclasses.fields(SECTIONS[section])
              if f.name not in skip and (keep is None or f.name in keep)]  # fmt: skip
    out: dict[str, gr.components.Component] = {}
    for start in range(0, len(fields), columns):
        with gr.Row():
            for f in fields[start : start + columns]:
                if f.name in overrides:
                    common = {
                        "label": label_of(f.name),
                        "info": f.metadata.get("help", "") + range_text(dict(f.metadata)),
                        "elem_id": f"cfg-{section}-{f.name}",
                    }
                    out[key(section, f.name)] = overrides[f.name](f, common)
                else:
                    out[key(section, f.name)] = field_component(section, f)
    return out


def config_dict(values: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`{section__field: value}` -> nested dict, values converted to their field's type
    (bounds are the dataclasses' to check: `config_from_values`).

    Sections or fields not in `values` keep `base` (default: the dataclass defaults).
    Raises ConfigError for an unknown key or a bad value.
    """
    data = {s: dict(v) for s, v in (base or {}).items()}
    fields = {
        key(s, f.name): (s, f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    }
    for k, value in values.items():
        if k not in fields:
            raise ConfigError(f"Unknown setting {k!r}.")
        section, f = fields[k]
        data.setdefault(section, {})[f.name] = convert_value(SECTIONS[section], f.name, value)
    return data


def config_from_values(values: dict[str, Any], base: dict[str, Any] | None = None) -> AdaptConfig:
    """A validated AdaptConfig from form values; raises ConfigError with a fix-it message."""
    return AdaptConfig.from_dict(config_dict(values, base))


def section_values(values: dict[str, Any], section: str) -> dict[str, Any]:
    """The values of one section's fields, keyed `section__field`."""
    prefix = section + SEP
    return {k: v for k, v in values.items() if k.startswith(prefix)}


def form_updates(config: dict[str, Any], components: dict[str, Any]) -> list[Any]:
    """Values for `components` (in order) from a nested config dict (e.g. a session's)."""
    out = []
    for k in components:
        section, name = k.split(SEP, 1)
        out.append(config.get(section, {}).get(name, gr.skip()))
    return out
