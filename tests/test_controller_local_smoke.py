import asyncio

import pytest

from forge.controller import AdverbError, ForgeActor, endpoint


class Counter(ForgeActor):
    def __init__(self, start: int = 0):
        self.value = start

    @endpoint
    async def incr(self, by: int = 1) -> tuple[int, int]:
        self.value += by
        return self.replica_id, self.value


def test_route_fanout_and_adverbs():
    async def main():
        svc = await Counter.options(num_replicas=2).as_service(start=5)
        rid, v = await svc.incr.route(3)
        assert v == 8
        res = await svc.incr.fanout(1)
        assert sorted(r for r, _ in res) == [0, 1]
        with pytest.raises(AdverbError):
            await svc.incr.call_one()
        actor = await Counter.as_actor(start=1)
        assert await actor.incr.call_one() == (0, 2)
        with pytest.raises(AdverbError):
            await actor.incr.route()
        await svc.shutdown()
        await actor.shutdown()

    asyncio.run(main())
