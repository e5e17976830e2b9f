"""Nothing lost, nothing silently wrong: the model survives every failure, outputs appear whole or not at all,
half-precision merges are rounded once, and the same spec gives the same bits every time, in every process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_llama, token_inputs
from oracle import peft_checkpoint, replace_tensor, run
from safetensors.torch import load, load_file
from torch import nn

import peftfx
from peftfx import atomic
from peftfx.atomic import replaced_file

KEY_B = "base_model.model.layers.1.lora_B.weight"
LORA = {"type": "lora", "at": {"op": "linear"}, "with": {"init": False}, "seed": 0}
DORA = {"type": "dora", "at": {"module": "layers.1"}, "with": {"init": False}, "seed": 1}
IA3_FF = {"type": "ia3", "at": {"module": "layers.1"}, "with": {"feedforward": True, "init": False}, "seed": 2}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "lora"
    peft_checkpoint(mlp(), peft.LoraConfig(r=2, target_modules=["layers.0", "layers.1"]), directory)
    return directory


def tree(model: nn.Module) -> list[tuple]:
    """The module tree as the user sees it: names, classes, parameter objects and their flags."""
    return [
        (name, type(m), [(n, id(p), p.requires_grad, p.grad) for n, p in m.named_parameters(recurse=False)])
        for name, m in model.named_modules()
    ]


def bits(model: nn.Module) -> dict[str, bytes]:
    """The state dict, bit for bit (NaN-safe, unlike torch.equal)."""
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in model.state_dict().items()}


# -- the input model is never mutated --------------------------------------------------------------------------


def failing_specs(ckpt: Path, tmp: Path) -> dict[str, tuple[dict, str]]:
    """Specs that fail at each stage, each after a first adapter that succeeded."""
    nan = tmp / "nan"
    shutil.copytree(ckpt, nan)
    replace_tensor(nan, KEY_B, lambda t: t.index_fill(0, torch.tensor([3]), float("nan")))
    return {
        "spec": ({"adapters": {"a": LORA, "b": {**LORA, "with": {"r": 0}}}}, r"adapters\.b\.with\.r"),
        "checkpoint": ({"adapters": {"a": LORA, "b": {"peft": str(tmp / "missing")}}}, r"adapters\.b\.peft"),
        "match": ({"adapters": {"a": LORA, "b": {**LORA, "at": {"module": "nope"}}}}, r"adapters\.b\.at: selector"),
        "insert": ({"adapters": {"a": LORA, "b": IA3_FF}}, r"adapters\.b: ia3 recomputes"),
        "merge order": ({"adapters": {"d": DORA, "a": LORA}, "merge": ["a"]}, r"do not commute"),
        "merge nan": ({"adapters": {"a": LORA, "n": {"peft": str(nan)}}, "merge": True}, r"adapter 'n' .* NaN"),
        "fold": (
            {"adapters": {"a": LORA, "n": {"peft": str(nan)}, "m": {"combine": ["a", "n"]}}},
            r"adapters\.m\.combine\[1\]: .*NaN",
        ),
    }


@pytest.mark.parametrize("stage", ["spec", "checkpoint", "match", "insert", "merge order", "merge nan", "fold"])
def test_failures_at_every_stage_leave_the_model_untouched(ckpt, tmp_path, stage):
    model, x = mlp(), mlp_inputs()
    before_bits, before_tree, before_out = bits(model), tree(model), run(model, x)
    spec, match = failing_specs(ckpt, tmp_path)[stage]
    with pytest.raises(peftfx.PeftfxError, match=match):
        peftfx.compile(model, spec, x)
    assert bits(model) == before_bits and tree(model) == before_tree
    assert torch.equal(run(model, x), before_out)


def test_training_the_graph_never_reaches_the_model():
    """Success too: a step of training on a live graph and a merge leave the model's tensors as they were."""
    model, x = mlp(), mlp_inputs()
    before_bits, before_tree = bits(model), tree(model)
    gm = peftfx.compile(model, {"adapters": {"a": LORA, "d": DORA}}, x)
    gm(*x).square().sum().backward()
    with torch.no_grad():
        for p in gm.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    peftfx.compile(model, {"adapters": {"a": LORA, "d": DORA}, "merge": True}, x)
    assert bits(model) == before_bits and tree(model) == before_tree


# -- threads: captures run one at a time, on a copy of the module tree ------------------------------------------


def race(model: nn.Module, x, spec: dict, compiles: int, rounds: int, meanwhile) -> tuple[list, list, list]:
    """``compiles`` threads compiling ``model`` ``rounds`` times each, while another calls ``meanwhile()`` over and
    over: the graphs' code, the errors (``(who, error)``), and what ``meanwhile`` returned while the compiles ran."""
    codes, errors, seen = [], [], []
    done, start = threading.Event(), threading.Barrier(compiles + 1)

    def compile_() -> None:
        start.wait()
        for _ in range(rounds):
            try:
                codes.append(peftfx.compile(model, spec, x).code)
            except Exception as error:  # kept for the test to judge
                errors.append(("compile", error))

    def watch() -> None:
        start.wait()
        while not done.is_set():
            try:
                seen.append(meanwhile())
            except Exception as error:
                errors.append(("meanwhile", error))
                return

    threads = [threading.Thread(target=compile_) for _ in range(compiles)] + [threading.Thread(target=watch)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns a hundred times more often: races show at once
    try:
        for t in threads:
            t.start()
        for t in threads[:-1]:
            t.join()
        done.set()
        threads[-1].join()
    finally:
        sys.setswitchinterval(interval)
    return codes, errors, seen


def test_compiles_racing_compiles_and_eager_calls_leave_the_model_whole():
    """fx patches nn.Module.__call__ for the whole process while it traces: an eager call in another thread went
    into the trace and failed ("module is not installed as a submodule"). Now the trace lets other threads be."""
    model, x = mlp(), mlp_inputs()
    before_bits, before_tree, expected = bits(model), tree(model), run(model, x)
    spec = {"adapters": {"a": LORA, "d": DORA}}
    codes, errors, outputs = race(model, x, spec, compiles=2, rounds=3, meanwhile=lambda: run(model, x))
    assert errors == [] and len(codes) == 6 and len(set(codes)) == 1
    assert outputs and all(torch.equal(out, expected) for out in outputs)
    assert bits(model) == before_bits and tree(model) == before_tree


def test_exports_racing_exports_never_touch_the_model_even_for_a_moment():
    """torch.export's fake modes are process-wide, so captures run one at a time; each on a copy of the module
    tree, so what a capture flips (``config.use_cache``, turned off for the export) never shows on the model.

    (Eager calls of a transformers model in another thread during an export are not tested: torch's tracing state
    reaches every thread, ``torch.compiler.is_compiling()`` is true in all, and transformers' hub kernels then
    share one context variable between threads, which can fail that call or the compile.)"""
    model, x = tiny_llama(), token_inputs()
    before_bits, before_tree = bits(model), tree(model)
    spec = {"adapters": {"a": {"type": "lora", "at": {"op": "linear", "module": "*.q_proj"}}}}
    codes, errors, seen = race(
        model, x, spec, compiles=2, rounds=1, meanwhile=lambda: (model.config.use_cache, tree(model) == before_tree)
    )
    assert errors == [] and len(codes) == 2 and len(set(codes)) == 1
    assert seen and set(seen) == {(True, True)}
    assert bits(model) == before_bits and tree(model) == before_tree


# -- outputs are written atomically ----------------------------------------------------------------------------


def _breaking_save_file(tensors, filename):
    Path(filename).write_bytes(b"half a safetensors fi")
    raise OSError("disk full")


def test_a_save_that_fails_while_writing_leaves_nothing(tmp_path, monkeypatch):
    gm = peftfx.compile(mlp(), {"adapters": {"a": LORA}}, mlp_inputs())
    monkeypatch.setattr("peftfx.save.save_file", _breaking_save_file)
    with pytest.raises(OSError, match="disk full"):
        peftfx.save_adapter(gm, "a", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary one


def test_a_save_that_fails_keeps_the_previous_adapter_whole(tmp_path, monkeypatch):
    first = peftfx.compile(mlp(), {"adapters": {"a": LORA}}, mlp_inputs())
    out = peftfx.save_adapter(first, "a", tmp_path / "out")
    saved = {f.name: f.read_bytes() for f in out.iterdir()}
    old_b = load(saved["adapter_model.safetensors"])[KEY_B]
    second = peftfx.compile(mlp(), {"adapters": {"a": {**LORA, "seed": 5}}}, mlp_inputs())
    monkeypatch.setattr("peftfx.save.save_file", _breaking_save_file)
    with pytest.raises(OSError):
        peftfx.save_adapter(second, "a", out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    peftfx.save_adapter(second, "a", out)  # and a save that works replaces it
    assert not torch.equal(load_file(out / "adapter_model.safetensors")[KEY_B], old_b)


@pytest.mark.parametrize("failing", [[1], [2], [2, 3]], ids=["old aside", "new in", "new in, old back"])
def test_replacing_an_adapter_fails_whole_at_every_rename(tmp_path, monkeypatch, failing):
    """Where the folders cannot be exchanged in one step, the folder is replaced by renames: the old one aside (1),
    the new one in (2), the old one back if that failed (3). Whichever fails, the previous adapter stays whole and
    loads as it did, config and weights."""
    first = peftfx.compile(mlp(), {"adapters": {"a": LORA}}, mlp_inputs())
    out = peftfx.save_adapter(first, "a", tmp_path / "out")
    (out / "README.md").write_text("the user's notes")
    saved = {f.name: f.read_bytes() for f in out.iterdir()}
    second = peftfx.compile(mlp(), {"adapters": {"a": {**LORA, "type": "dora", "seed": 5}}}, mlp_inputs())
    calls, rename = [], os.replace

    def flaky(src, dst):
        calls.append(src)
        if len(calls) in failing:
            raise OSError(f"rename {len(calls)} failed")
        rename(src, dst)

    monkeypatch.setattr("peftfx.atomic.os.replace", flaky)
    monkeypatch.setattr("peftfx.atomic._exchange", lambda staged, path: False)
    with pytest.raises(OSError, match=r"rename|put back") as info:
        peftfx.save_adapter(second, "a", out)
    monkeypatch.undo()
    if failing == [2, 3]:  # the old folder could not be put back: it is kept, and the error says where
        (aside,) = [p for p in tmp_path.iterdir() if p.name != "out"]
        assert not out.exists() and f"the previous one is at {aside / 'old'}" in str(info.value)
        os.replace(aside / "old", out)
        aside.rmdir()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    gm = peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(out)}}}, mlp_inputs())
    torch.testing.assert_close(run(gm, mlp_inputs()), run(first, mlp_inputs()), rtol=0, atol=0)
    peftfx.save_adapter(second, "a", out)  # and one that works replaces it, keeping what is not the adapter
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    assert (out / "README.md").read_text() == "the user's notes"


@pytest.mark.skipif(atomic._libc() is None, reason="no C library to call")
def test_a_folder_is_exchanged_in_one_step_or_left_whole(tmp_path, monkeypatch):
    """On Linux the new folder and the old one swap in one rename (no moment without the folder), and the data
    and the folders' entries are flushed to the disk first; a failed swap leaves the previous folder whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    synced, swapped, exchange = [], [], atomic._exchange
    monkeypatch.setattr(atomic, "_sync", lambda path: synced.append(path.name))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: swapped.append(exchange(a, b)) or swapped[-1])
    with atomic.replaced_folder(out) as staged:
        (staged / "new.txt").write_text("new")
    if swapped != [True]:
        pytest.skip("this kernel or filesystem cannot exchange folders (the renames above are tested apart)")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "out"
    ]
    assert synced[:2] == ["new.txt", "new"] and synced[-1] == tmp_path.name, "data, its folder, then the rename"

    def fails(a, b):
        raise OSError("exchange failed")

    monkeypatch.setattr(atomic, "_exchange", fails)
    with pytest.raises(OSError, match="exchange failed"), atomic.replaced_folder(out) as staged:
        (staged / "newer.txt").write_text("newer")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "out"
    ]


def test_replaced_file(tmp_path):
    """What ``export_onnx`` writes through: the old file stays until the new one is complete."""
    target = tmp_path / "model.pt2"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), replaced_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("export failed")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with replaced_file(target) as tmp:
        assert tmp.suffix == ".pt2"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


# -- dtypes: half precisions merge once-rounded ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_is_the_rounded_float64_merge(ckpt, dtype):
    """The merged weight is the float64 merge rounded once to the model's dtype (so within half an ulp of it, the
    best any rounding can do); PEFT adds a delta already rounded to that dtype, within one ulp."""
    model, x = mlp(dtype=dtype), mlp_inputs(dtype=dtype)
    merged = peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}, "merge": True}, x).state_dict()
    peft_model = peft.PeftModel.from_pretrained(mlp(dtype=dtype), ckpt).eval()
    scaling = peft_model.base_model.model.layers[1].scaling["default"]
    peft_merged = peft_model.merge_and_unload().state_dict()
    tensors = load_file(ckpt / "adapter_model.safetensors")
    for i in (0, 1):
        a, b = (tensors[f"base_model.model.layers.{i}.lora_{f}.weight"].double() for f in "AB")
        reference = model.layers[i].weight.double() + scaling * b @ a
        ours, theirs = merged[f"layers.{i}.weight"], peft_merged[f"layers.{i}.weight"]
        assert ours.dtype == dtype and torch.equal(ours, reference.to(dtype))
        ulp = _ulp(reference.to(dtype))
        assert ((theirs.double() - reference).abs() <= ulp).all()  # PEFT: one ulp
        assert ((ours.double() - reference).abs() <= (theirs.double() - reference).abs()).all()  # never worse


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at each entry, in float64."""
    info = torch.finfo(x.dtype)
    exponent = torch.floor(torch.log2(x.double().abs().clamp_min(info.tiny)))
    return torch.exp2(exponent) * info.eps


# -- determinism ---------------------------------------------------------------------------------------------

MIXED = {
    "adapters": {
        "a": {**LORA, "with": {"r": {"gradient": [2, 4]}, "init": False}},
        "v": {"type": "vera", "at": {"module": "layers.0"}, "with": {"r": 4, "init": False}, "seed": 3},
        "l": {"type": "loha", "at": {"module": "layers.1"}, "with": {"r": 2, "init_weights": False}, "seed": 4},
        "d": {"combine": ["a", "l"], "method": "dare_ties_svd", "density": 0.5, "seed": 7},
    },
    "active": ["v", "d"],
}
MERGED = {**MIXED, "merge": ["v"]}


def fingerprint(gm: torch.fx.GraphModule) -> str:
    """One digest of a graph's code, every tensor's name, dtype and bits, and its output."""
    h = hashlib.sha256(gm.code.encode())
    for name, tensor in sorted(gm.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    with torch.no_grad():
        h.update(gm(*mlp_inputs()).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_same_spec_same_bits():
    model, x = mlp(), mlp_inputs()
    for spec in (MIXED, MERGED):
        first, second = peftfx.compile(model, spec, x), peftfx.compile(model, spec, x)
        assert first.code == second.code
        assert bits(first) == bits(second)
        assert torch.equal(run(first, x), run(second, x))
        assert fingerprint(first) == fingerprint(second)
    reference = fingerprint(peftfx.compile(model, MIXED, x))
    torch.manual_seed(123)  # the global RNG does not enter a seeded spec
    assert fingerprint(peftfx.compile(model, MIXED, x)) == reference
    assert fingerprint(peftfx.compile(model, MERGED, x)) != reference


SCRIPT = """
import sys
sys.path[:0] = [{tests!r}]
import torch
torch.set_num_threads(1)
import peftfx
from models import mlp, mlp_inputs, tiny_llama, token_inputs
from test_reliability import MERGED, MIXED, fingerprint
print(*(fingerprint(peftfx.compile(mlp(), spec, mlp_inputs())) for spec in (MIXED, MERGED)))
"""


@pytest.mark.slow
def test_same_bits_across_processes():
    """Python's hash seed reorders sets and dict-of-set iteration between processes: nothing may depend on it."""
    tests = str(Path(__file__).parent)
    here = " ".join(fingerprint(peftfx.compile(mlp(), spec, mlp_inputs())) for spec in (MIXED, MERGED))
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT.format(tests=tests)], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == here.split(), out.stderr


def test_outputs_get_the_mode_a_plain_write_would(tmp_path):
    """Written through private temporaries (0600 files, 0700 folders), outputs still end up as ``open`` makes them."""
    umask = os.umask(0)
    os.umask(umask)
    with replaced_file(tmp_path / "m.onnx") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~umask
    gm = peftfx.compile(mlp(), {"adapters": {"a": {"type": "lora", "at": {"op": "linear"}}}}, mlp_inputs())
    peftfx.save_adapter(gm, "a", tmp_path / "saved")
    assert (tmp_path / "saved").stat().st_mode & 0o777 == 0o777 & ~umask


# -- devices: adapter tensors live where their site's weight lives ----------------------------------------------


def test_a_meta_model_gives_a_graph_on_meta(ckpt, tmp_path):
    """A model on the meta device (planning a merge out of core): live, DoRA and merged graphs build and run on meta,
    every adapter tensor placed on the site's device (the same path puts them on CUDA for a CUDA model)."""
    model = mlp().to("meta")
    x = (torch.empty(3, 12, device="meta"),)
    dora_ckpt = tmp_path / "dora"
    peft_checkpoint(mlp(), peft.LoraConfig(r=2, target_modules=["layers.0"], use_dora=True), dora_ckpt)
    specs = [
        {"adapters": {"a": {"peft": str(ckpt)}}},
        {"adapters": {"a": {"peft": str(dora_ckpt)}}},
        {"adapters": {"d": DORA}},
        {"adapters": {"a": {"peft": str(ckpt)}, "d": DORA}, "merge": True},
    ]
    for spec in specs:
        gm = peftfx.compile(model, spec, x)
        assert {t.device.type for t in gm.state_dict().values()} == {"meta"}, spec
        assert gm(*x).device.type == "meta"
