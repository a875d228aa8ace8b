import html.parser
import os
import socket

import pytest
import torch
from torch import nn

from s3server import start_s3_server

# Quiet, offline Ray for the tests that need it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

# No test reaches AWS, whatever credentials this machine has: fake keys, no instance metadata, and
# an S3 request that does not name its endpoint (endpoint_override) goes to a port of 127.0.0.1
# where nothing listens, and fails. The port is held (bound, never listening) for the whole
# session, so nothing else can take it. Set before Ray starts: its workers inherit them.
_NO_DEFAULT_ENDPOINT = socket.socket()
_NO_DEFAULT_ENDPOINT.bind(("127.0.0.1", 0))
os.environ.update(AWS_ACCESS_KEY_ID="embcam-test-key", AWS_SECRET_ACCESS_KEY="embcam-test-secret",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{_NO_DEFAULT_ENDPOINT.getsockname()[1]}")
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)


# The modules that take longest (`pytest --durations=0`), longest first. `make test` gives each
# module whole to one worker (--dist loadscope: a module's fixtures, and the jobs they run, run
# once) in this order (--no-loadscope-reorder), so that the long ones start first and both
# workers end together.
LONGEST_FIRST = ("test_resume.py", "test_reproduce_cub.py", "test_multinode.py", "test_pipeline.py", "test_cli.py",
                 "test_plans.py", "test_architectures.py", "test_pairs.py", "test_results.py", "test_bench_smoke.py",
                 "test_job_transformers.py", "test_s3.py", "test_user_code.py", "test_inference.py",
                 "test_hostile.py")


def pytest_collection_modifyitems(items):
    """A test that uses the shared Ray (directly or through a fixture) is slow: `make test-fast`
    leaves it out. Tests that run jobs or subprocesses otherwise are marked where they are."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, like the CI machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 << 20, ignore_reinit_error=True)
    # Ray Data's cluster-wide (detached) actors, made by this process and its job: a test that
    # kills every process of a job that joined this Ray then never kills them. An actor pool
    # makes them all (stats, autoscaling, actor locations).
    class Same:  # local: pickled by value, the workers need not import this file
        def __call__(self, batch):
            return batch

    ray.data.range(1).map_batches(Same, concurrency=1).materialize()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1 with an empty bucket (tests/s3server.py),
    stopped at the end of the session."""
    server = start_s3_server()
    yield server
    server.stop()


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
