import trio


async def test_trio_runs() -> None:
    await trio.sleep(0)
