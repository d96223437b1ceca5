"""place() holds the cyclic collector off for the batch and leaves it as it found it."""

from __future__ import annotations

import gc

import pytest
from cluster_builders import host, snapshot, vm
from hvplace.coordinator.placement import Batch, place
from hvplace.coordinator.placement import engine as engine_module


def test_the_collector_is_off_during_a_batch_and_back_after() -> None:
    seen: list[bool] = []
    inner = engine_module._place

    def spy(*args: object) -> object:
        seen.append(gc.isenabled())
        return inner(*args)  # type: ignore[arg-type]

    snap = snapshot([host("h0")])
    was = gc.isenabled()
    try:
        gc.enable()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(engine_module, "_place", spy)
            assert place(snap, Batch((vm("a"),))).assignments == {"t1/a": "h0"}
            assert gc.isenabled()
            gc.disable()  # a caller that keeps it off finds it off
            place(snap, Batch((vm("b"),)))
            assert not gc.isenabled()
        assert seen == [False, False]
    finally:
        if was:
            gc.enable()


def test_a_failing_batch_gives_the_collector_back() -> None:
    def boom(*_args: object) -> object:
        raise RuntimeError("boom")

    was = gc.isenabled()
    try:
        gc.enable()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(engine_module, "_place", boom)
            with pytest.raises(RuntimeError):
                place(snapshot([host("h0")]), Batch((vm("a"),)))
        assert gc.isenabled()
    finally:
        if not was:
            gc.disable()
