"""The capture cache: a second capture of the same model structure and inputs loads the graph instead of running
torch.export, binds the current model's weights (never stale ones), misses on any change of config, structure,
inputs or versions, holds no weights, survives a corrupt file and concurrent writers, and can be turned off.

Exports are counted by wrapping ``torch.export.export``; outputs are compared exactly (the same graph on the same
weights: bit-identical).
"""

from __future__ import annotations

import json
import os
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


def test_the_cache_is_on_by_default(cache, exports, monkeypatch):
    model, inputs = tiny_llama(), token_inputs()
    monkeypatch.delenv("PEFTFX_CACHE")
    peftfx.compile(model, {}, inputs)
    peftfx.compile(model, {}, inputs)
    assert len(exports) == 1 and len(list(cache.iterdir())) == 1


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
    assert [f.suffix for f in cache.iterdir()] == [".fx"]
    model, inputs = tiny_llama(), token_inputs()
    peftfx.capture(model, inputs)
    assert not exports


USER_MODEL = """
import torch
from {helper} import scale


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return scale(self.proj(x))
"""


def _user_code(root: Path, factor: float, package: str) -> None:
    """A model in one of the user's packages calling a helper in another (neither is installed)."""
    for name, text in ((f"{package}_model", USER_MODEL.format(helper=f"{package}_helper")), (f"{package}_helper", "")):
        (root / name).mkdir(exist_ok=True)
        (root / name / "__init__.py").write_text(text)
    (root / f"{package}_helper" / "__init__.py").write_text(f"def scale(x):\n    return x * {factor}\n")


def _import_user_model(root: Path, package: str):
    import importlib

    for name in (f"{package}_helper", f"{package}_model"):  # as a new process would import the edited files
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    return importlib.import_module(f"{package}_model").Net


def test_an_edited_source_file_is_a_miss(cache, exports, tmp_path, monkeypatch):
    """The helper lives in another package than the model's class: only the manifest can see it changed."""
    monkeypatch.syspath_prepend(str(tmp_path))
    package = f"user{abs(hash(tmp_path)) % 10**8}"
    _user_code(tmp_path, 2.0, package)
    x = (torch.randn(3, 4),)
    torch.manual_seed(0)
    model = _import_user_model(tmp_path, package)()
    peftfx.capture(model, x, method="export")
    peftfx.capture(model, x, method="export")
    assert len(exports) == 1
    helper = tmp_path / f"{package}_helper" / "__init__.py"
    helper.write_text(helper.read_text().replace("2.0", "3.0"))
    torch.manual_seed(0)
    edited = _import_user_model(tmp_path, package)()
    gm = peftfx.capture(edited, x, method="export")
    assert len(exports) == 2
    assert torch.equal(gm(*x), edited(*x)) and torch.equal(gm(*x), model(*x) * 1.5)


def test_a_method_patched_at_run_time_is_a_miss(cache, exports, monkeypatch):
    model, inputs = tiny_llama(), token_inputs()
    peftfx.capture(model, inputs)
    mlp = type(model.model.layers[0].mlp)
    original = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda self, x: original(self, x) * 2)
    gm = peftfx.capture(model, inputs)
    assert len(exports) == 2
    assert torch.equal(*outputs(gm, model, inputs))


def test_a_class_redefined_without_a_file_is_a_miss(cache, exports):
    """Code with no source file (``python -c``, a notebook cell) is digested itself: same name, other body."""
    made = []
    for factor in (2, 3):
        namespace: dict = {}
        exec(USER_MODEL.format(helper="math").replace("from math import scale", "") .replace(
            "scale(self.proj(x))", f"self.proj(x) * {factor}"), namespace)  # fmt: skip
        torch.manual_seed(0)
        model = namespace["Net"]()
        made.append(peftfx.capture(model, (torch.ones(2, 4),), method="export"))
    assert len(exports) == 2
    assert torch.equal(made[1](torch.ones(2, 4)), model(torch.ones(2, 4)))


def test_dynamic_shapes_from_the_cache_keep_their_input_checks(cache, exports):
    model, inputs = tiny_llama(), token_inputs()
    fresh = peftfx.capture(model, inputs, dynamic_shapes="auto", cache=False)
    peftfx.capture(model, inputs, dynamic_shapes="auto")
    gm = peftfx.capture(model, inputs, dynamic_shapes="auto")
    assert len(exports) == 2 and gm.code == fresh.code
    for seq in (3, 9):
        longer = {"input_ids": torch.randint(0, 64, (2, seq))}
        assert torch.equal(*outputs(gm, model, longer))
    static = peftfx.capture(model, inputs)
    with pytest.raises(AssertionError, match="Guard failed"):
        static(input_ids=torch.randint(0, 64, (2, 7)))


def test_the_least_recently_used_files_go_beyond_the_limit(cache, exports, monkeypatch):
    from peftfx import capture_cache

    monkeypatch.setattr(capture_cache, "KEEP", 2)
    cache.mkdir(parents=True)
    (cache / "old-format.pt2").write_bytes(b"a capture of an earlier peftfx")
    model = tiny_llama()
    for seq in (3, 4, 5):
        peftfx.capture(model, {"input_ids": torch.randint(0, 64, (1, seq))})
    assert sorted(f.suffix for f in cache.iterdir()) == [".fx", ".fx"], "the oldest and the old format went"
    peftfx.capture(model, {"input_ids": torch.randint(0, 64, (1, 5))})
    assert len(exports) == 3, "the newest stayed"
    monkeypatch.setattr(capture_cache, "KEEP_BYTES", 1)
    peftfx.capture(model, {"input_ids": torch.randint(0, 64, (1, 6))})
    assert not list(cache.iterdir()), "none fits in a byte"


def test_a_generation_capture_is_cached_and_generates_the_same_tokens(cache, exports):
    """compile(max_cache_len=L) captures a step over a static KV cache (dynamic sequence dim): served from the
    cache, it generates what a fresh capture does, and ``cache=False`` still exports."""
    model, ids = tiny_llama(), token_inputs()["input_ids"]
    lora = {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2, "init": False}, "seed": 0}
    spec = {"adapters": {"a": lora}}
    fresh = peftfx.compile(model, spec, {"input_ids": ids}, max_cache_len=12, cache=False)
    peftfx.compile(model, spec, {"input_ids": ids}, max_cache_len=12)
    cached = peftfx.compile(model, spec, {"input_ids": ids}, max_cache_len=12)
    assert len(exports) == 2 and len(list(cache.iterdir())) == 1
    want = peftfx.generate(fresh, ids, max_new_tokens=5)
    assert torch.equal(peftfx.generate(cached, ids, max_new_tokens=5), want)


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="file owners are POSIX")
def test_a_file_another_user_wrote_is_never_read(cache, exports, monkeypatch):
    """A cache file is a pickle, code to Python: one in a shared folder written by someone else is a miss."""
    import os

    model, inputs = tiny_llama(), token_inputs()
    peftfx.capture(model, inputs)
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    peftfx.capture(model, inputs)
    assert len(exports) == 2


class _Stateful(torch.nn.Module):
    """Buffers (persistent or not) and a plain tensor attribute: values no key holds, each the model's own."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(4).eval()
        self.norm.running_mean.fill_(value)
        self.register_buffer("offset", torch.full((4,), value), persistent=False)
        self.plain = torch.full((4,), -value)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)) + self.offset * self.plain


def test_buffers_and_tensor_attributes_are_the_current_models(cache, exports):
    x = (torch.randn(3, 4),)
    first, second = _Stateful(1.0), _Stateful(5.0)
    peftfx.capture(first, x, method="export")
    gm = peftfx.capture(second, x, method="export")
    assert len(exports) == 1
    assert torch.equal(gm(*x), second(*x)) and not torch.equal(gm(*x), first(*x))


def test_a_read_only_cache_still_serves(cache, exports, monkeypatch):
    """Marking a file recently used fails on a read-only cache (a shared mount): it is served all the same."""
    import os

    model, inputs = tiny_llama(), token_inputs()
    peftfx.capture(model, inputs)

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "utime", read_only)
    peftfx.capture(model, inputs)
    assert len(exports) == 1


def test_the_cli_says_what_the_cache_holds_and_empties_it(cache, exports):
    model, inputs = tiny_llama(), token_inputs()
    peftfx.capture(model, inputs)
    runner = CliRunner()
    info = runner.invoke(app, ["cache", "info", "--format", "json"])
    assert info.exit_code == 0, info.output
    held = json.loads(info.output)
    assert held["files"] == 1 and held["bytes"] == next(cache.iterdir()).stat().st_size and held["enabled"]
    assert "1 captures" in runner.invoke(app, ["cache"]).output
    cleared = runner.invoke(app, ["cache", "clear", "--format", "json"])
    assert cleared.exit_code == 0 and json.loads(cleared.output)["removed"] == 1 and not list(cache.iterdir())
    peftfx.capture(model, inputs)
    assert len(exports) == 2, "a cleared cache captures again"
    assert runner.invoke(app, ["cache", "purge"]).exit_code == 2


def test_source_paths_resolve_as_realpath_does(tmp_path, monkeypatch):
    """The manifest tells installed code from the user's by resolved paths: a package symlinked into an
    installation (``flit install --symlink``) is the user's, whether its folder or its file is the link."""
    from peftfx.capture_cache import _real

    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "m.py").write_text("")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "linked").symlink_to(tmp_path / "dev")
    (tmp_path / "site" / "file.py").symlink_to(tmp_path / "dev" / "m.py")
    monkeypatch.chdir(tmp_path / "site")
    folders: dict[str, str] = {}
    paths = [str(tmp_path / "site" / "linked" / "m.py"), str(tmp_path / "site" / "file.py"), "file.py", "linked/m.py"]
    for path in [*paths, *paths]:  # the second time from the folders already resolved
        assert _real(path, folders) == os.path.realpath(path) == str((tmp_path / "dev" / "m.py").resolve())
