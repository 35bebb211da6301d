"""The batch-work allocator settings: applied on Linux/glibc, never over a user's own MALLOC_* settings."""

import os
import subprocess
import sys

import pytest

from mpoxscope.engine.allocator import tune_for_batch_work


def _tune_in_child(env: dict) -> str:
    code = "from mpoxscope.engine.allocator import tune_for_batch_work as t; print(t())"
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applied_by_default_and_not_over_user_settings():
    clean = {k: None for k in os.environ if k.startswith("MALLOC_") or k == "MPOXSCOPE_MALLOC"}
    assert _tune_in_child(clean) == "True"
    assert _tune_in_child({**clean, "MALLOC_ARENA_MAX": "2"}) == "False"  # the user's allocator settings win
    assert _tune_in_child({**clean, "MPOXSCOPE_MALLOC": "default"}) == "False"


def test_off_linux_it_does_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tune_for_batch_work() is False
