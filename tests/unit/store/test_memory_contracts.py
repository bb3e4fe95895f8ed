"""The store contract suites on the in-memory implementations: no Redis, no broker.

The suites live in ``tests/integration/store`` and run there on Redis and Redis Cluster;
imported here, the same test functions run with this module's ``store`` fixtures.
"""

from __future__ import annotations

import pytest

from stream_app.store.bandit import InMemoryBanditStore
from stream_app.store.deadlines import InMemoryDeadlineStore
from stream_app.store.models import InMemoryClusterModelStore
from stream_app.store.profiles import InMemoryProfileStore
from stream_app.store.step_stats import InMemoryStepStatsStore
from tests.integration.store import (
    test_bandit_store_contract as bandit_contract,
)
from tests.integration.store import (
    test_cluster_model_store_contract as models_contract,
)
from tests.integration.store import (
    test_deadline_store_contract as deadlines_contract,
)
from tests.integration.store import (
    test_profile_store_contract as profiles_contract,
)
from tests.integration.store import (
    test_step_stats_contract as stats_contract,
)

IMPLEMENTATIONS = {
    bandit_contract: InMemoryBanditStore,
    models_contract: InMemoryClusterModelStore,
    deadlines_contract: InMemoryDeadlineStore,
    profiles_contract: InMemoryProfileStore,
    stats_contract: InMemoryStepStatsStore,
}


def _tests() -> list[tuple[str, object]]:
    out = []
    for module in IMPLEMENTATIONS:
        for name in dir(module):
            if name.startswith("test_"):
                out.append((f"{module.__name__.rsplit('.', 1)[-1]}::{name}", getattr(module, name)))
    return out


@pytest.mark.parametrize(("name", "test"), _tests(), ids=[n for n, _ in _tests()])
async def test_contract_on_memory(name: str, test: object) -> None:
    module = next(m for m in IMPLEMENTATIONS if name.startswith(m.__name__.rsplit(".", 1)[-1]))
    store = IMPLEMENTATIONS[module]()
    import inspect

    assert callable(test)
    params = inspect.signature(test).parameters
    if "store" not in params or len(params) != 1:
        pytest.skip(f"{name} needs more than a store")
    await test(store)  # type: ignore[operator]
