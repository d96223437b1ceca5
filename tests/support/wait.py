"""The one way tests wait: for a condition, never for a fixed time.

`eventually` polls a check (sync or async) in a test's event loop; `eventually_blocking`
does the same from plain (thread or subprocess driving) code. Both return the check's
first truthy result and fail with the check's last assertion when it never comes.
Give generous limits: CI runs on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def eventually(
    check: Callable[[], Any], within: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Until `check()` returns something truthy (sync or async); its last error otherwise."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
        except (AssertionError, LookupError) as e:
            last = e
        await asyncio.sleep(interval)
    raise AssertionError(f"{what or 'condition'} not true after {within}s: {last!r}")


def eventually_blocking(
    check: Callable[[], Any], within: float = 10.0, interval: float = 0.1, what: str = ""
) -> Any:
    """`eventually` for code outside an event loop (it sleeps the calling thread)."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, LookupError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what or 'condition'} not true after {within}s: {last!r}")
