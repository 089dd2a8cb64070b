"""What a missing real part means: a skip on a developer's machine, a failure in CI.

The suite tests against real PostgreSQL, Redis, openssl, the LiteLLM proxy's environment
and the embedded model, all installed by scripts/bootstrap.sh. Where one is missing, its
tests skip with the reason; with ``CI=true`` that skip becomes a failure, because a green CI
must not hide a failed install. The one documented exception is real classic exo: without
``EXO_SRC`` its tests skip everywhere, and their reason starts with :data:`EXO_SRC_UNSET`.

Loaded as a pytest plugin by tests/conftest.py, so the rule covers every skip of the suite,
``skipif`` markers included.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

# The start of the one skip reason CI accepts (tests/support/processes.py: exo_skip_reason).
EXO_SRC_UNSET = "EXO_SRC unset:"


def in_ci() -> bool:
    """True in CI (``CI=true``, as CI runners set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def ci_failure(reason: str) -> str | None:
    """Why a skip with ``reason`` fails this run, or None when it may stay a skip."""
    if not in_ci() or reason.startswith(EXO_SRC_UNSET):
        return None
    return f"CI=true: a missing real part is a failure, not a skip ({reason})"


def missing(reason: str) -> NoReturn:
    """Stop the current test for a missing real part: skip, or fail in CI."""
    failure = ci_failure(reason)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    pytest.skip(reason)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Turn a skip (a ``skipif`` marker's or a ``pytest.skip``) into a failure in CI unless it
    is the documented EXO_SRC one."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail"):
        failure = ci_failure(_skip_reason(report))
        if failure is not None:
            report.outcome = "failed"
            report.longrepr = failure
    return None
