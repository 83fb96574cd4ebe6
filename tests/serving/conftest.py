"""Fixtures for the serving tests: one tiny trained chat model folder and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # serving_testdata (a uniquely named helper module)

from serving_testdata import build_model_folder, make_server  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs one op at a time; two torch threads on a shared 2-core machine only spin.
    Restored after each module, so other test folders keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("serving") / "tiny-chat")


@pytest.fixture(scope="session")
def server(model_folder):
    """The full server (API + Gradio UI at /), greedy by default, batch 8, queue 16."""
    thread, scheduler = make_server(model_folder, ui=True)
    with thread:
        thread.scheduler = scheduler
        yield thread


@pytest.fixture(scope="session")
def busy_server(model_folder):
    """One slot, no queue, an API key, 100 ms per forward (greedy replies here run ~22 tokens): easy to fill, to overload and to walk away from; the UI asks for the key as its password."""
    thread, scheduler = make_server(model_folder, ui=True, slow_s=0.1, max_batch=1, max_queue=0, api_key="secret")
    with thread:
        thread.scheduler = scheduler
        thread.api_key = "secret"
        yield thread
