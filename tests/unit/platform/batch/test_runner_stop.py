"""stop() ends the runner's loop even when the cancel lands as its wait for a wake-up ends (Python 3.11's
asyncio.wait_for dropped such a cancel: the loop ran on and stop() waited for ever, a CI run's hang)."""

from __future__ import annotations

import asyncio

from herd.platform.batch.runner import BatchRunner, RunnerSettings


class NoBatches:
    def open_batches(self) -> list[object]:
        return []


def test_stop_right_after_a_wake_up_ends_the_loop():
    async def main() -> int:
        stopped = 0
        for _ in range(50):
            runner = BatchRunner(NoBatches(), None, None, lambda _: None,  # type: ignore[arg-type]
                                 settings=RunnerSettings(poll_interval_s=30))
            runner.start()
            for _ in range(3):  # into its wait for a wake-up
                await asyncio.sleep(0)
            runner.wake()  # the wait's future is done, the loop not yet resumed: the cancel lands now
            stop = asyncio.create_task(runner.stop())
            done, _ = await asyncio.wait({stop}, timeout=5)  # the next poll is 30 s away
            if not done:
                break
            stopped += 1
        return stopped

    assert asyncio.run(main()) == 50
