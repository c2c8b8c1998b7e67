import os
import tempfile

import pyro
import pytest
import torch

# runs trained by the tests are trusted in a record of their own, never the user's
# ~/.cache/ppl_lvm/trusted_code.txt
os.environ["PPL_LVM_TRUST_FILE"] = os.path.join(tempfile.mkdtemp(prefix="ppl-lvm-trust-"),
                                                "trusted_code.txt")


@pytest.fixture
def fresh_param_store():
    """An empty param store before and after the test (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("fresh_param_store")``)."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
