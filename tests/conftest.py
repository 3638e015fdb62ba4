import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision, device): give every test a fresh one."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's runs (resumed and reference runs then reduce floats in the same order, as the
    one-thread fault-injection worker does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
