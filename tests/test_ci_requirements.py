"""The optional test dependencies (bitsandbytes, scikit-learn, seqeval, the shared data) fail in CI when absent."""

from __future__ import annotations

import _pytest.outcomes
import conftest
import pytest


def test_a_missing_dependency_skips_locally_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(_pytest.outcomes.Skipped):
        conftest.require("no_such_module_lra_peft")
    with pytest.raises(_pytest.outcomes.Skipped):
        conftest.require_condition(False, "needs ../shared/data")
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(ImportError):
        conftest.require("no_such_module_lra_peft")
    with pytest.raises(_pytest.outcomes.Failed, match="must be available in CI"):
        conftest.require_condition(False, "needs ../shared/data")
    assert conftest.require("json").dumps([1]) == "[1]"
    conftest.require_condition(True, "unused")
