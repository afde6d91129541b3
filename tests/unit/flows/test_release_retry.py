"""The flow's retry condition for its I/O tasks (dvc push, release): a release refused because stages are
stale is not retried (it would be refused again after each delay), a registry failure that may recover is."""

from __future__ import annotations

import pickle

import pytest
from prefect import flow, task
from prefect.states import Failed

from loraline.config import OrchestrateParams
from loraline.flows.pipeline import _io_policy, dvc_push, release, retry_unless_refused
from loraline.registry.base import PromotionConflict, RegistryError, ReleaseRefused, StaleRelease

STALE = StaleRelease("t1: not released, DVC reports stages out of date: merge@t1 (...)", "t1", ("merge@t1", "gate@t1"))
PUSH_FAILED = RegistryError("git push origin refs/tags/t1-adapter@v0.0.2 failed in /p: Connection timed out")


def _failed(exc: BaseException) -> Failed:
    """The state Prefect's task engine hands the retry condition when a task raises `exc`."""
    return Failed(data=exc, message=f"Task run encountered an exception {type(exc).__name__}: {exc}")


def test_a_release_refused_for_stale_stages_is_not_retried():
    assert not retry_unless_refused(None, None, _failed(STALE))
    assert not retry_unless_refused(
        None, None, _failed(ReleaseRefused("t1: not released, dvc.lock's records disagree"))
    )


@pytest.mark.parametrize(
    "error", [PUSH_FAILED, PromotionConflict("t1-adapter", "v0.0.1", "v0.0.2"), OSError("disk busy")]
)
def test_a_failure_that_may_recover_is_retried(error: BaseException):
    assert retry_unless_refused(None, None, _failed(error))


def test_the_stale_error_is_a_registry_error_that_keeps_its_stages_when_pickled():
    assert isinstance(STALE, RegistryError)  # callers catching RegistryError (the CLI) still report it
    copy = pickle.loads(pickle.dumps(STALE))
    assert (type(copy), str(copy), copy.tenant, copy.stages) == (
        StaleRelease,
        str(STALE),
        "t1",
        ("merge@t1", "gate@t1"),
    )


def test_the_flows_io_tasks_carry_the_condition():
    policy = _io_policy(OrchestrateParams(io_retries=3, retry_delay_seconds=0))
    for io_task in (release, dvc_push):
        configured = io_task.with_options(**policy)
        assert configured.retries == 3 and configured.retry_condition_fn is retry_unless_refused


@pytest.mark.slow
def test_prefect_runs_a_stale_release_once_and_a_failed_push_until_its_retries_are_spent(monkeypatch):
    """Through Prefect's own engine (a temporary API server), a task in a flow as the pipeline runs release."""
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    attempts: list[str] = []

    def fails_with(error: BaseException) -> None:
        attempts.append(type(error).__name__)
        raise error

    @flow
    def releasing(error: BaseException) -> None:
        task(fails_with).with_options(**_io_policy(OrchestrateParams(io_retries=2, retry_delay_seconds=0)))(error)

    with prefect_test_harness(server_startup_timeout=120):
        for error in (STALE, PUSH_FAILED):
            with pytest.raises(type(error)):
                releasing(error)
    assert attempts == ["StaleRelease", "RegistryError", "RegistryError", "RegistryError"]
