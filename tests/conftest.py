import html.parser
import os

import pytest
import torch
from torch import nn

# Quiet, offline Ray for the tests that need it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def pytest_collection_modifyitems(items):
    """A test that uses the shared Ray (directly or through a fixture) is slow: `make test-fast`
    leaves it out. Tests that run jobs or subprocesses otherwise are marked where they are."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, like the CI machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 << 20, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def float64():
    """float64 models and tensors for one test (the default dtype is restored after)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class HtmlPage(html.parser.HTMLParser):
    """What a browser would see of a page: its tags, image sources and text."""

    def __init__(self):
        super().__init__()
        self.tags, self.sources, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.sources += [value for name, value in attrs if tag == "img" and name == "src"]

    def handle_data(self, data):
        self.text.append(data)


def randomise_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine terms."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model
