"""Policy discovery (entry points), options, and dependency order.

Built-in and third-party policies register the same way, in the entry-point
group ``gateway.policies``. A ``[policies.<name>]`` table enables one; its
``enabled``, ``timeout`` and ``observe`` keys are the gateway's, every other key goes to the
policy's ``Options`` dataclass. A missing dependency or a cycle is a config
error that says how to fix it, never a run-time surprise.
"""

from __future__ import annotations

import graphlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from gateway.api import Policy, SymbolDef
from gateway.schema import Problems, build, describe

__all__ = [
    "GATEWAY_SYMBOLS",
    "EnabledPolicy",
    "Plan",
    "discover",
    "plan_policies",
]

ENTRY_POINT_GROUP = "gateway.policies"

# Symbols the gateway itself emits on behalf of a policy.
GATEWAY_SYMBOLS: Mapping[str, SymbolDef] = {
    "POLICY_ERROR": SymbolDef(0.0, "a policy failed with an error; the message is retried (451)"),
    "POLICY_TIMEOUT": SymbolDef(0.0, "a policy did not finish within its timeout (451)"),
    "MIME_UNPARSEABLE": SymbolDef(
        5.0, "the MIME structure could not be parsed; content was not inspected (quarantined)"
    ),
    "MIME_TOO_COMPLEX": SymbolDef(
        5.0, "more multipart containers than pipeline.max_mime_containers (quarantined)"
    ),
}


def discover() -> dict[str, type[Policy]]:
    """Every installed policy class by entry-point name."""
    found: dict[str, type[Policy]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep  # type: ignore[assignment]  # loaded lazily below
    return found


def _load(ep: Any, name: str, problems: Problems) -> type[Policy] | None:
    try:
        cls = ep.load() if hasattr(ep, "load") else ep
    except Exception as exc:  # a broken plugin must stop start-up, with its name
        problems.add(f"policies.{name}", f"cannot load policy plugin: {type(exc).__name__}: {exc}")
        return None
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        problems.add(f"policies.{name}", "entry point is not a gateway.api.Policy subclass")
        return None
    if cls.name != name:
        problems.add(
            f"policies.{name}", f'policy class declares name "{cls.name}", entry point is "{name}"'
        )
        return None
    return cls


@dataclass(frozen=True, slots=True)
class EnabledPolicy:
    name: str
    cls: type[Policy]
    options: Any
    timeout: float | None
    observe: bool = False  # its symbols and floors are observed only (docs/observe.md)


@dataclass(frozen=True, slots=True)
class Plan:
    """Enabled policies in a valid dependency order."""

    policies: tuple[EnabledPolicy, ...]

    def symbols(self) -> dict[str, tuple[str, SymbolDef]]:
        """Every declared symbol -> (policy name, definition)."""
        out: dict[str, tuple[str, SymbolDef]] = {
            name: ("gateway", d) for name, d in GATEWAY_SYMBOLS.items()
        }
        for p in self.policies:
            for name, d in p.cls.symbols.items():
                out[name] = (p.name, d)
        return out


def plan_policies(
    tables: Mapping[str, Mapping[str, Any]],
    problems: Problems,
    available: Mapping[str, Any] | None = None,
) -> Plan:
    """Validate ``[policies.*]`` tables against installed policies and order them."""
    available = dict(discover() if available is None else available)
    enabled: dict[str, EnabledPolicy] = {}
    for name, table in tables.items():
        key = f"policies.{name}"
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, list(available), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            installed = ", ".join(sorted(available)) or "none"
            problems.add(key, f"no such policy installed{hint}; installed: {installed}")
            continue
        table = dict(table)
        on = table.pop("enabled", True)
        if not isinstance(on, bool):
            problems.add(f"{key}.enabled", f"must be true or false, got {describe(on)}")
            continue
        timeout = table.pop("timeout", None)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            problems.add(
                f"{key}.timeout", f"must be a number of seconds > 0, got {describe(timeout)}"
            )
            timeout = None
        observe = table.pop("observe", False)
        if not isinstance(observe, bool):
            problems.add(f"{key}.observe", f"must be true or false, got {describe(observe)}")
            observe = False
        cls = _load(available[name], name, problems)
        if cls is None:
            continue
        # A disabled table is checked too: a typo shows now, not the day it is enabled.
        if observe and not cls.observable:
            problems.add(
                f"{key}.observe",
                f"{name} is a hard protection that always acts, even in observe mode; "
                "remove observe = true (docs/observe.md)",
            )
            observe = False
        options = build(cls.Options, table, key, problems)
        if options is None or not on:
            continue
        enabled[name] = EnabledPolicy(
            name, cls, options, float(timeout) if timeout is not None else None, observe
        )
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for name, ep in enabled.items():
        for dep in ep.cls.after:
            if dep not in enabled:
                problems.add(
                    f"policies.{name}",
                    f'runs after "{dep}", which is not enabled; add a [policies.{dep}] table '
                    f"or set policies.{name}.enabled = false",
                )
        deps = (*ep.cls.after, *getattr(ep.cls, "after_optional", ()))
        sorter.add(name, *(d for d in deps if d in enabled))
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        problems.add("policies", f"dependency cycle {cycle}; remove one of these 'after' links")
        order = list(enabled)
    return Plan(tuple(enabled[n] for n in order if n in enabled))
