"""python/transformer/gpt_char.py at CI size: every method trains, prunes to its targets
and reports finite losses."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "python" / "transformer" / "gpt_char.py"
_spec = importlib.util.spec_from_file_location("gpt_char", _PATH)
gpt_char = sys.modules["gpt_char"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(gpt_char)


@pytest.fixture(scope="module")
def tiny():
    cfg = gpt_char.Config(n_layer=1, n_head=2, d_model=16, ctx=16, batch=4, steps=3, eval_batches=1)
    return cfg, gpt_char.Data(gpt_char.load_text(), cfg.ctx)


def test_embedded_text_is_there():
    text = gpt_char.load_text()
    assert len(text) > 400_000 and "lambda" in text


@pytest.mark.parametrize("method", gpt_char.METHODS)
def test_each_method_trains_and_prunes(tiny, method):
    cfg, data = tiny
    r = gpt_char.run(method, cfg, 0, data)
    assert math.isfinite(r["val_loss_dense"])
    assert [p["target"] for p in r["pruned"]] == cfg.sparsities
    for p in r["pruned"]:
        assert abs(p["sparsity"] - p["target"]) < 1e-3 and math.isfinite(p["val_loss"])


def test_bad_method_raises(tiny):
    cfg, data = tiny
    with pytest.raises(ValueError, match="method"):
        gpt_char.run("sgd", cfg, 0, data)
