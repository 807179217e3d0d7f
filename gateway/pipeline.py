"""Runs policies concurrently, each as soon as the policies it reads have finished.

Each policy runs under its timeout. A policy that raises or times out becomes
``POLICY_ERROR`` / ``POLICY_TIMEOUT`` with a TEMPFAIL floor (by default): never
a silent pass, and the exception text goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.api import Action, Context, OptionError, Policy, Result, Services, Symbol
from gateway.config import ConfigError
from gateway.registry import Plan

__all__ = ["Pipeline", "PipelineRun", "PolicyRun"]

log = logging.getLogger("gateway.pipeline")


@dataclass(frozen=True, slots=True)
class PolicyRun:
    name: str
    result: Result
    seconds: float
    outcome: str  # "ok", "error" or "timeout"


@dataclass(frozen=True, slots=True)
class PipelineRun:
    runs: tuple[PolicyRun, ...]

    @property
    def results(self) -> dict[str, Result]:
        return {r.name: r.result for r in self.runs}


class Pipeline:
    """Instantiated policies of one config generation."""

    def __init__(
        self,
        plan: Plan,
        *,
        default_timeout: float,
        on_error: Action | None = Action.TEMPFAIL,
    ) -> None:
        self.plan = plan
        self.default_timeout = default_timeout
        self.on_error = on_error
        self.policies: dict[str, Policy] = {p.name: p.cls(p.options) for p in plan.policies}
        self._timeouts = {p.name: p.timeout or default_timeout for p in plan.policies}
        names = {p.name for p in plan.policies}
        self._after = {
            p.name: p.cls.after
            + tuple(d for d in getattr(p.cls, "after_optional", ()) if d in names)
            for p in plan.policies
        }

    async def start(self, services: Services) -> None:
        """Start every policy; a policy's OptionError (a missing rule file, say) is a
        ConfigError naming ``policies.<name>.<key>``, so ``run`` and SIGHUP report it
        like any other config problem."""
        for name, policy in self.policies.items():
            try:
                await policy.start(services)
            except OptionError as exc:
                await self.close()
                raise ConfigError([f"policies.{name}.{exc.key}: {exc.message}"]) from None

    async def close(self) -> None:
        for name, policy in self.policies.items():
            try:
                await policy.close()
            except Exception:
                log.exception("policy_close_failed", extra={"policy": name})

    async def run(self, ctx: Context) -> PipelineRun:
        tasks: dict[str, asyncio.Task[PolicyRun]] = {}
        for name in self.policies:  # plan order is a topological order
            deps = {d: tasks[d] for d in self._after[name]}
            tasks[name] = asyncio.create_task(self._run_one(name, ctx, deps))
        try:
            runs = await asyncio.gather(*tasks.values())
        except BaseException:
            for t in tasks.values():
                t.cancel()
            raise
        return PipelineRun(tuple(runs))

    async def _run_one(
        self, name: str, ctx: Context, deps: Mapping[str, asyncio.Task[PolicyRun]]
    ) -> PolicyRun:
        dep_results = {d: (await t).result for d, t in deps.items()}
        policy = self.policies[name]
        view = ctx.with_results(dep_results)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeouts[name]):
                result = await policy.check(view)
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
            log.warning(
                "policy_timed_out",
                extra={"policy": name, "queue_id": ctx.queue_id, "timeout": self._timeouts[name]},
            )
            result = Result(
                symbols=(
                    Symbol("POLICY_TIMEOUT", detail=f"{name} exceeded {self._timeouts[name]}s"),
                ),
                force=self.on_error,
                reason=f"policy {name} timed out",
            )
        except Exception as exc:
            outcome = "error"
            log.exception(
                "policy_failed",
                extra={"policy": name, "queue_id": ctx.queue_id, "error": type(exc).__name__},
            )
            result = Result(
                symbols=(Symbol("POLICY_ERROR", detail=f"{name}: {type(exc).__name__}"),),
                force=self.on_error,
                reason=f"policy {name} failed",
            )
        return PolicyRun(name, result, time.perf_counter() - started, outcome)
