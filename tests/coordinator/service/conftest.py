import pytest

from tests.coordinator.helpers import MODELS
from tests.serving import running_server


@pytest.fixture(scope="module")
def servers():
    """Two fast servers of the coordinator's test models, shared by a module's tests."""
    with running_server(MODELS) as first, running_server(MODELS) as second:
        yield [first, second]


@pytest.fixture(scope="module")
def slow_servers():
    """Two servers that sleep 40 ms per batch, so a job runs long enough to be interrupted."""
    slow = {"TF_TEST_DELAY_MS": "40"}
    with running_server(MODELS, env=slow) as first, running_server(MODELS, env=slow) as second:
        yield [first, second]
