import pytest

from tests.serving import running_server

from .helpers import MODELS


@pytest.fixture(scope="module")
def servers():
    """Two servers of the coordinator's test models, shared by a module's tests."""
    with running_server(MODELS) as first, running_server(MODELS) as second:
        yield [first, second]
