"""LoopWaker: engine futures resolved in another thread reach asyncio futures of one loop with
their results, exceptions and cancellations, however many finish at once."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from sie_server.api.waker import LoopWaker


def test_results_exceptions_and_cancellations_arrive() -> None:
    async def main() -> None:
        waker = LoopWaker(asyncio.get_running_loop())
        futures = [concurrent.futures.Future() for _ in range(300)]
        mirrors = [waker.watch(f) for f in futures]

        def finish() -> None:
            for i, f in enumerate(futures):
                if i % 3 == 0:
                    f.set_result(i)
                elif i % 3 == 1:
                    f.set_exception(ValueError(i))
                else:
                    f.cancel()

        thread = threading.Thread(target=finish)
        thread.start()
        outcomes = await asyncio.gather(*mirrors, return_exceptions=True)
        thread.join()
        for i, out in enumerate(outcomes):
            if i % 3 == 0:
                assert out == i
            elif i % 3 == 1:
                assert isinstance(out, ValueError) and out.args == (i,)
            else:
                assert isinstance(out, asyncio.CancelledError)

        # a waiter that gave up (deadline) is skipped when its result comes later
        late = concurrent.futures.Future()
        mirror = waker.watch(late)
        mirror.cancel()
        late.set_result("too late")
        await asyncio.sleep(0.01)
        assert mirror.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await mirror

    asyncio.run(main())
