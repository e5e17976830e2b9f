"""The capture cache: a second capture of the same model structure and inputs loads the graph instead of running
torch.export, binds the current model's weights (never stale ones), misses on any change of config, structure,
inputs or versions, holds no weights, survives a corrupt file and concurrent writers, and can be turned off.

Exports are counted by wrapping ``torch.export.export``; outputs are compared exactly (the same graph on the same
weights: bit-identical).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import tiny_llama, token_inputs
from typer.testing import CliRunner

import peftfx
from peftfx.cli import app

TESTS = Path(__file__).parent


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PEFTFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PEFTFX_CACHE", "1")
    return tmp_path / "cache" / "capture"


@pytest.fixture
def exports(monkeypatch) -> list[int]:
    """How many times torch.export ran."""
    calls: list[int] = []
    real = torch.export.export

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls


def outputs(gm, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return gm(**inputs).logits, model(**inputs).logits


def test_a_second_capture_loads_the_graph_and_binds_the_current_weights(cache, exports):
    """The hit: no export; the same code; another model of the same structure gets its own weights, not the first's."""
    first, inputs = tiny_llama(), token_inputs()
    gm = peftfx.capture(first, inputs)
    assert len(exports) == 1 and len(list(cache.iterdir())) == 1
    again = peftfx.capture(first, inputs)
    assert len(exports) == 1 and again.code == gm.code
    got, want = outputs(again, first, inputs)
    assert torch.equal(got, want)

    other = tiny_llama(seed=1)
    reused = peftfx.capture(other, inputs)
    assert len(exports) == 1
    got, want = outputs(reused, other, inputs)
    assert torch.equal(got, want) and not torch.equal(got, outputs(gm, first, inputs)[0])
    assert dict(reused.named_parameters())["model.embed_tokens.weight"].data_ptr() == (
        other.model.embed_tokens.weight.data_ptr()
    ), "the model's own storage, as a fresh capture"
    lora = {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2, "init": False}, "seed": 0}
    live = peftfx.compile(first, {"adapters": {"a": lora}}, inputs)  # sites found in the loaded graph as in a fresh one
    assert len(exports) == 1
    assert live.code == peftfx.compile(first, {"adapters": {"a": lora}}, inputs, cache=False).code


def test_the_cache_holds_no_weights(cache):
    model, inputs = tiny_llama(hidden_size=64, intermediate_size=256), token_inputs()
    peftfx.capture(model, inputs)
    (file,) = cache.iterdir()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert file.stat().st_size < weights / 2


def _bigger_head(model):
    model.lm_head = torch.nn.Linear(32, 80, bias=False)  # the config still says 64: only the structure tells
    return model


MISSES = {
    "config": (lambda: tiny_llama(rms_norm_eps=1e-3), token_inputs),
    "weight shape": (lambda: _bigger_head(tiny_llama()), token_inputs),
    "dtype": (lambda: tiny_llama(dtype=torch.float64), token_inputs),
    "input shape": (tiny_llama, lambda: {"input_ids": token_inputs()["input_ids"][:, :5]}),
    "input names": (tiny_llama, lambda: {**token_inputs(), "attention_mask": torch.ones(2, 6, dtype=torch.int64)}),
}


@pytest.mark.parametrize("case", MISSES)
def test_any_change_is_a_miss(cache, exports, case):
    peftfx.capture(tiny_llama(), token_inputs())
    make, make_inputs = MISSES[case]
    model, inputs = make(), make_inputs()
    gm = peftfx.capture(model, inputs)
    assert len(exports) == 2 and len(list(cache.iterdir())) == 2
    got, want = outputs(gm, model, inputs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("library", ["torch", "transformers", "peftfx"])
def test_another_library_version_is_a_miss(cache, exports, monkeypatch, library):
    model, inputs = tiny_llama(), token_inputs()
    peftfx.capture(model, inputs)
    monkeypatch.setattr(sys.modules[library], "__version__", "0.0.0+other")
    peftfx.capture(model, inputs)
    assert len(exports) == 2


def test_opt_out(cache, exports, monkeypatch):
    model, inputs = tiny_llama(), token_inputs()
    peftfx.compile(model, {}, inputs, cache=False)
    assert len(exports) == 1 and not cache.exists()
    monkeypatch.setenv("PEFTFX_CACHE", "0")
    peftfx.compile(model, {}, inputs)
    assert len(exports) == 2 and not cache.exists()
    monkeypatch.setenv("PEFTFX_CACHE", "1")
    CliRunner().invoke(app, ["--no-cache", "schema", "--output", str(cache.parent.parent / "schema.json")])
    peftfx.compile(model, {}, inputs)
    assert len(exports) == 3 and not cache.exists(), "--no-cache turns it off for the command's process"


def test_the_cache_is_opt_in(cache, exports, monkeypatch):
    """A stale graph would be silently wrong, and the key cannot see every line a model runs: off unless asked."""
    model, inputs = tiny_llama(), token_inputs()
    monkeypatch.delenv("PEFTFX_CACHE")
    peftfx.compile(model, {}, inputs)
    assert len(exports) == 1 and not cache.exists()
    peftfx.compile(model, {}, inputs, cache=True)
    peftfx.compile(model, {}, inputs, cache=True)
    assert len(exports) == 2 and len(list(cache.iterdir())) == 1
    CliRunner().invoke(app, ["--cache", "schema", "--output", str(cache.parent.parent / "schema.json")])
    peftfx.compile(model, {}, inputs)
    assert len(exports) == 2, "--cache turns it on for the command's process"


def test_an_unreadable_file_is_a_miss_and_is_replaced(cache, exports):
    model, inputs = tiny_llama(), token_inputs()
    peftfx.capture(model, inputs)
    (file,) = cache.iterdir()
    file.write_bytes(file.read_bytes()[:1000])  # cut short, as by a full disk
    gm = peftfx.capture(model, inputs)
    assert len(exports) == 2
    assert torch.equal(*outputs(gm, model, inputs))
    peftfx.capture(model, inputs)
    assert len(exports) == 2, "the file was written whole again"


@pytest.mark.slow
def test_concurrent_writers(cache, tmp_path, exports):
    """Two processes capturing the same model into one empty cache at once: both succeed, one whole file is left
    (no temporary one), and a third capture reads it."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        from models import tiny_llama, token_inputs
        import peftfx
        model, inputs = tiny_llama(), token_inputs()
        gm = peftfx.capture(model, inputs)
        with torch.no_grad():
            assert torch.equal(gm(**inputs).logits, model(**inputs).logits)
        """
    )
    runs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr.decode()[-2000:]
    assert [f.suffix for f in cache.iterdir()] == [".pt2"]
    model, inputs = tiny_llama(), token_inputs()
    peftfx.capture(model, inputs)
    assert not exports
