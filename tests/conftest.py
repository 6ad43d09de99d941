"""Environment setup and fixtures only; shared functions and constants are in helpers.py."""

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the Triton kernels are tested in Triton's CPU interpreter (read when a kernel is defined, so before
# hf_performer.ops_triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_performer  # noqa: E402,F401  (registers the Auto classes)

from helpers import tiny_config  # noqa: E402


@pytest.fixture
def make_config():
    return tiny_config


def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    """One thread for a test: tiny matrices only add contention with two threads on a shared machine (token-by-token
    decoding went from ~4 ms to ~200 ms a step with 2 threads under load; QR slowed 100x). Modules use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    yield from _one_thread()


@pytest.fixture(scope="module")
def single_thread_per_module():
    """``single_thread`` for a whole module, module-scoped fixtures (training runs) included."""
    yield from _one_thread()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Stubs the Hub: repositories are folders under ``.root``; a commit copies its files in and is recorded in
    ``.commits`` as (repo_id, message, sorted paths); no repository has a model card yet."""
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    hub = tmp_path / "hub"
    commits = []

    def create_repo(self, repo_id, **kwargs):
        (hub / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        commits.append((repo_id, commit_message, sorted(op.path_in_repo for op in operations)))
        for operation in operations:
            target = hub / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
        return SimpleNamespace(commit_url=f"offline://{repo_id}")

    def no_card_yet(repo_id, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no README.md yet")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", staticmethod(no_card_yet))
    return SimpleNamespace(root=hub, commits=commits)
