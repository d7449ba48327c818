import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny networks: OpenMP barriers, not FLOPs, set the time, and with a second thread on a shared
    machine every op can wait out a scheduler slice (tests ran 10x slower). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
