"""What ``exo-remote doctor`` says: one :class:`Check` per verdict, printed as ``ok``,
``FAIL`` (with its fix) or ``skip``, and a count; the node and host checks share it."""

from __future__ import annotations

from dataclasses import dataclass

from exo_remote_engine.contract.redaction import redact

TIMEOUT_S = 5.0  # for each connection or call a check makes


@dataclass(frozen=True)
class Check:
    """One verdict: ``ok`` None means skipped (not applicable here), with why."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


def render(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        word = {True: "ok  ", False: "FAIL", None: "skip"}[check.ok]
        lines.append(f"{word}  {check.name}: {check.detail}")
        if check.fix and check.ok is False:
            lines.append(f"      fix: {check.fix}")
    failed = sum(c.ok is False for c in checks)
    lines.append(
        f"{failed} failed, {sum(c.ok is True for c in checks)} ok, {sum(c.ok is None for c in checks)} skipped"
    )
    return redact("\n".join(lines))
