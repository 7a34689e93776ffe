"""Moving the champion: gated promotion (compare-and-set), promotion by hand, and rollback.

Each move happens under :func:`~gauntlet.registry.lock.registry_lock` and re-reads the champion there, so
it always acts on the champion it compared with; a gated promotion whose champion changed meanwhile is
decided again (:func:`gauntlet.gate.decide`) against the new one. Every move is recorded in the history.
"""

from __future__ import annotations

from gauntlet.audit import record
from gauntlet.config.gate import GateSpec, RegistrySpec
from gauntlet.gate import decide
from gauntlet.refs import EvalReport, GateDecision, PromotionResult, RegisteredVersion
from gauntlet.registry.lock import RegistryError, actor, registry_lock
from gauntlet.registry.reports import version_report
from gauntlet.registry.store import (
    ChampionEvent,
    champion_of,
    champion_stack,
    clear_challenger,
    get_version,
    history,
    record_verdict,
    set_champion,
)


def promote_if_passing(c, registry: RegistrySpec, gate: GateSpec, decision: GateDecision,
                       candidate: RegisteredVersion, report: EvalReport, base: EvalReport | None,
                       by: str, run_ids: dict[str, str | None] | None = None) -> PromotionResult:
    """Compare-and-set: under the registry lock, re-read the champion; if it is not the one ``decision``
    compared against, decide again against the one that is; move ``champion`` only on a pass."""
    name, version = registry.model_name, candidate.version
    result = dict(model_name=name, version=version)
    with registry_lock(c, name, registry.lock_timeout_s) as lease:
        current, scores = champion_of(c, registry)
        if current == version:   # a re-run of the champion's own recipe: keep the verdict it was promoted with
            return PromotionResult(registered=False, alias=registry.champion_alias, previous_champion=current,
                                   decision=decision, message=f"this model already is {name} v{version} "
                                                              f"@{registry.champion_alias}", **result)
        regated = current != decision.compared_to
        if regated:
            decision = decide(gate, report, base, current, scores, version_report(c, name, current))
        record_verdict(c, registry, version, decision)
        if not decision.passed:
            clear_challenger(c, registry, version)
            why = "; ".join(decision.reasons)
            message = (f"champion changed to v{current} meanwhile; re-gated and not promoted because {why}" if regated
                       else f"{name} v{version} not promoted because {why}")
            return PromotionResult(registered=False, previous_champion=current, decision=decision, message=message,
                                   **result)
        against = f"v{current}" if current else "no champion"
        why = f"gate passed against {against}" + (" (re-gated: the champion changed meanwhile)" if regated else "")
        set_champion(c, registry, version, current, "promote", by, why, lease, compared_to=current, **(run_ids or {}))
        record("promote", f"{name} v{version}", why, by=by, client=c, model=name, version=version, previous=current,
               alias=registry.champion_alias, flow_run_id=(run_ids or {}).get("prefect_flow_run_id"))
    return PromotionResult(registered=True, alias=registry.champion_alias, previous_champion=current,
                           decision=decision,
                           message=f"{name} v{version} is now @{registry.champion_alias} ("
                                   + (f"replaced v{current}" if current else "the first champion")
                                   + (", after re-gating against it" if regated else "") + ")", **result)


def promote_manually(c, registry: RegistrySpec, version: str, reason: str, by: str | None = None) -> ChampionEvent | None:
    """``gauntlet promote``: a person moves the champion, gate or no gate; the reason is recorded.
    Returns None when the version already is the champion."""
    if not reason.strip():
        raise RegistryError("a promotion by hand needs a --reason: it is recorded in the history")
    mv = get_version(c, registry.model_name, version)
    with registry_lock(c, registry.model_name, registry.lock_timeout_s) as lease:
        current, _ = champion_of(c, registry)
        if current == str(mv.version):
            return None
        event = set_champion(c, registry, str(mv.version), current, "manual-promote", by or actor(),
                             f"{reason} (gate verdict: {mv.tags.get('gate.verdict', 'none')})", lease)
        record("manual-promote", f"{registry.model_name} v{mv.version}", event.reason, by=by or actor(), client=c,
               model=registry.model_name, version=str(mv.version), previous=current, alias=registry.champion_alias)
        return event


def rollback(c, registry: RegistrySpec, reason: str = "", by: str | None = None) -> ChampionEvent:
    """``gauntlet rollback``: give ``champion`` back to the version that held it before the current one."""
    name = registry.model_name
    with registry_lock(c, name, registry.lock_timeout_s) as lease:
        stack = champion_stack(history(c, name))
        current, _ = champion_of(c, registry)
        if current is None:
            raise RegistryError(f"{name!r} has no champion: nothing to roll back")
        if not stack or stack[-1] != current:
            raise RegistryError(f"{name}@{registry.champion_alias} is v{current}, but the recorded history ends with "
                                f"v{stack[-1] if stack else '(nothing)'}: the alias was moved outside Gauntlet. "
                                f"Use `gauntlet promote {name} VERSION --reason …` to choose the champion")
        if len(stack) < 2:
            raise RegistryError(f"v{current} is the first recorded champion of {name!r}: there is no previous "
                                "champion to roll back to")
        target = stack[-2]
        event = set_champion(c, registry, target, current, "rollback", by or actor(),
                             reason or f"rolled back from v{current}", lease)
        c.set_model_version_tag(name, current, "champion.rolled_back_at", event.at)
        record("rollback", f"{name} v{target}", event.reason, by=by or actor(), client=c, model=name,
               version=target, previous=current, alias=registry.champion_alias)
        return event
