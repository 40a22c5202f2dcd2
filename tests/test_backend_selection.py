"""Backend selection: auto falls back loudly, a pinned qwen3 fails to start, pocketsphinx is offline."""

import logging

import pytest

from deployments.backends import load_backend
from deployments.backends.qwen3 import ModelUnavailable
from serve_app.settings import GraphArgs

MISSING_MODEL = "example-org/not-in-the-local-cache"


def test_auto_uses_qwen3_when_its_weights_load(tiny_checkpoint):
    backend = load_backend(GraphArgs(backend="auto", qwen3_model=str(tiny_checkpoint), qwen3_dtype="float32"))
    assert backend.info.name == "qwen3"


def test_auto_falls_back_to_pocketsphinx_with_a_loud_warning(caplog):
    # Once Serve has started in this process its logger stops propagating: listen on it directly.
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            backend = load_backend(GraphArgs(backend="auto", qwen3_model=MISSING_MODEL))
    finally:
        serve_logger.removeHandler(caplog.handler)
    assert backend.info.name == "pocketsphinx"
    assert any("FALLING BACK" in record.getMessage() for record in caplog.records)


def test_pinned_qwen3_fails_at_start_instead_of_falling_back():
    with pytest.raises(ModelUnavailable):
        load_backend(GraphArgs(backend="qwen3", qwen3_model=MISSING_MODEL))


def test_pocketsphinx_needs_no_model():
    assert load_backend(GraphArgs(backend="pocketsphinx")).info.name == "pocketsphinx"
