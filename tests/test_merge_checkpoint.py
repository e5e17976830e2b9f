"""``peftfx merge``: a sharded transformers checkpoint merged out of core equals PEFT's merge_and_unload and
peftfx's own compile-and-merge, loads in transformers, keeps names, dtypes and ties, and is written atomically."""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import threading
import time
from pathlib import Path

import peft
import pytest
import torch
from models import tiny_llama
from oracle import peft_checkpoint
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import peftfx
from peftfx import out_of_core as ooc
from peftfx.cli import app
from peftfx.errors import CheckpointError, PeftfxError

IDS = {"input_ids": torch.tensor([[3, 17, 9, 40, 1, 22]])}


def checkpoint(
    tmp_path: Path,
    dtype: torch.dtype,
    tie: bool,
    targets: list[str],
    dora: bool = False,
    save: list | None = None,
    shards: str = "20KB",
    **sizes: int,
) -> tuple:
    """A tiny Llama (``sizes`` override its config) saved in shards of at most ``shards`` (a larger tensor alone
    in its own), and a PEFT LoRA on ``targets`` moved off its init."""
    model = tiny_llama(dtype=dtype, tie_word_embeddings=tie, **sizes)
    model.save_pretrained(tmp_path / "base", max_shard_size=shards)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, modules_to_save=save)
    peft_checkpoint(model, config, tmp_path / "adapter")
    return model, {"adapters": {"a": {"peft": str(tmp_path / "adapter")}}}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return out


def test_sharded_merge_equals_peft_and_compile_and_loads(tmp_path):
    model, spec = checkpoint(tmp_path, torch.float32, False, ["q_proj", "v_proj", "down_proj"], save=["lm_head"])
    out = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out", max_shard_size="30KB")
    written, stored = tensors(out), tensors(tmp_path / "base")
    assert list(written) == list(stored) or sorted(written) == sorted(stored)
    assert all(written[k].dtype == stored[k].dtype and written[k].shape == stored[k].shape for k in stored)
    index = json.loads((out / ooc.INDEX).read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    assert all(s.stat().st_size <= 30_000 + 4096 for s in shards)  # a shard: its tensors plus the header
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").merge_and_unload()
    compiled = peftfx.compile(model, {**spec, "merge": True}, IDS).state_dict()
    for key, tensor in peft_merged.state_dict().items():
        # float32: PEFT adds a float32 delta, peftfx rounds the exact sum once; they differ in the last bits only
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=1e-6, atol=1e-7)
        assert torch.equal(written[key], compiled[key]), key  # the same merge as compile's, bit for bit
    assert not torch.equal(
        written["model.layers.0.self_attn.q_proj.weight"], stored["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(written["lm_head.weight"], stored["lm_head.weight"])  # modules_to_save: PEFT's copy
    with torch.no_grad():
        torch.testing.assert_close(loaded(**IDS).logits, peft_merged(**IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on_embedding", [False, True])
def test_tied_weights(tmp_path, on_embedding):
    """Tied embeddings stay tied when no merge touches them; a merge into the embedding unties the head, which
    keeps the original weight (as compile's merge does: see README, "Tied weights")."""
    targets = ["q_proj", "embed_tokens"] if on_embedding else ["q_proj"]
    model, spec = checkpoint(tmp_path, torch.bfloat16, True, targets)
    out = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out")
    written, config = tensors(out), json.loads((out / "config.json").read_text())
    assert ("lm_head.weight" in written) is on_embedding
    assert config.get("tie_word_embeddings", True) is not on_embedding
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    gm = peftfx.compile(model, {**spec, "merge": True}, IDS)
    with torch.no_grad():  # bfloat16: the graph's kernels and eager's round differently, by a few ulps
        torch.testing.assert_close(loaded(**IDS).logits, gm(**IDS).logits, rtol=0.02, atol=0.02)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        assert torch.equal(loaded.get_submodule(module).weight, gm.get_submodule(module).weight)
    if on_embedding:
        assert torch.equal(written["lm_head.weight"], model.lm_head.weight)
        assert not torch.equal(written["model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_dora_bf16_equals_compile_bit_for_bit(tmp_path):
    model, spec = checkpoint(tmp_path, torch.bfloat16, False, ["q_proj", "gate_proj"], dora=True)
    out = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out")
    compiled = peftfx.compile(model, {**spec, "merge": True}, IDS).state_dict()
    written = tensors(out)
    assert all(torch.equal(written[k], compiled[k]) for k in written)


def test_two_adapters_at_one_site_equal_compile_bit_for_bit(tmp_path):
    """A LoRA then a DoRA on the same weights: the second merges the first's result (held in a buffer that then
    serves the next weight), DoRA declines to merge into a given buffer and makes its own."""
    model, spec = checkpoint(tmp_path, torch.bfloat16, False, ["q_proj", "gate_proj"])
    dora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], use_dora=True)
    peft_checkpoint(model, dora, tmp_path / "dora")
    spec = {"adapters": {**spec["adapters"], "b": {"peft": str(tmp_path / "dora")}}}
    out = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out", max_shard_size="30KB")
    compiled = peftfx.compile(model, {**spec, "merge": True}, IDS).state_dict()
    written = tensors(out)
    assert all(torch.equal(written[k], compiled[k]) for k in written)
    assert not torch.equal(
        written["model.layers.1.self_attn.q_proj.weight"], model.model.layers[1].self_attn.q_proj.weight
    )


@pytest.mark.parametrize("where", ["merge", "copy"])
def test_an_interrupted_merge_leaves_nothing(tmp_path, monkeypatch, where):
    """Stopped mid-way, in the merge (a user's Ctrl-C) or in the copy thread (a full disk): the error comes out,
    nothing is left behind, and the copy thread is gone."""
    _, spec = checkpoint(tmp_path, torch.float32, False, ["q_proj"])
    calls = []
    name, error = ("get", KeyboardInterrupt) if where == "merge" else ("_copy_range", OSError)
    original = getattr(ooc._Tensors, name) if where == "merge" else ooc._copy_range

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:
            raise error("interrupted")
        return original(*args)

    monkeypatch.setattr(*((ooc._Tensors, name) if where == "merge" else (ooc, name)), failing)
    with pytest.raises(error, match="interrupted"):
        ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out", max_shard_size="30KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
    assert not [t for t in threading.enumerate() if t.name == "peftfx-merge-copy"]


def test_the_copy_without_copy_file_range_and_a_shard_cut_short(tmp_path, monkeypatch):
    """Where the kernel cannot copy between the files (another file system, another OS), the bytes go through a
    buffer, to the same result; a shard cut once its header was read is refused by the copy, naming the tensor."""
    _, spec = checkpoint(tmp_path, torch.bfloat16, False, ["q_proj"])
    kernel = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "kernel", max_shard_size="30KB")

    def refused(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refused)
    buffered = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "buffered", max_shard_size="30KB")
    files = sorted(p.name for p in kernel.iterdir())
    assert files == sorted(p.name for p in buffered.iterdir())
    assert all((kernel / f).read_bytes() == (buffered / f).read_bytes() for f in files)
    shard = max((tmp_path / "base").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    source, partial = ooc._Source(tmp_path / "base"), tmp_path / "partial"
    partial.mkdir()
    os.truncate(shard, shard.stat().st_size - 100)  # after the index was read: the copy finds it
    cut = re.escape(f"{shard.name} ends inside tensor")
    with pytest.raises(PeftfxError, match=cut), ooc._Shards(partial, source, 30_000) as shards:
        shards.start({})
        shards._wait(len(shards.pieces) - 1)


def test_a_merged_tensor_is_written_over_its_copy_never_under_it(tmp_path, monkeypatch):
    """The copy thread held inside a merged weight's copy until the merge has made that weight: the merge waits
    for the copy to end, then writes; the output is the one an unhindered run writes."""
    _, spec = checkpoint(tmp_path, torch.bfloat16, False, ["q_proj"])
    expected = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "expected", max_shard_size="30KB")
    key, made, holds = "model.layers.0.self_attn.q_proj.weight", threading.Event(), []
    copy, get = ooc._copy_range, ooc._Tensors.get

    def held(*args):
        if args[-1].endswith(repr(key)):  # what the copy names, should the input end early
            holds.append(made.wait(10))
            time.sleep(0.2)  # the merged weight is ready to be written: it must not be, yet
        return copy(*args)

    def getting(self, name):
        tensor = get(self, name)
        made.set()
        return tensor

    monkeypatch.setattr(ooc, "_copy_range", held)
    monkeypatch.setattr(ooc._Tensors, "get", getting)
    out = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out", max_shard_size="30KB")
    assert holds == [True]  # the copier was inside the weight's place when the merge had made it
    files = sorted(p.name for p in expected.iterdir())
    assert all((out / f).read_bytes() == (expected / f).read_bytes() for f in files)


def test_every_byte_written_is_sent_to_the_disk_as_it_goes_in_small_writes(tmp_path, monkeypatch):
    """Each merged tensor is written in calls of at most ``_WRITE`` bytes, short writes resumed, and every tensor's
    bytes (copied or merged) are handed to the disk's writeback as soon as they are written; the output is the one
    whole writes make."""
    _, spec = checkpoint(tmp_path, torch.bfloat16, False, ["q_proj", "down_proj"], hidden_size=64)
    expected = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "expected", max_shard_size="30KB")
    calls, started, pwrite = [], [], os.pwrite

    def short(fd, data, offset):  # a write the kernel cuts short: at most 1000 bytes taken
        calls.append(len(data))
        return pwrite(fd, data[:1000], offset)

    def writeback(fd, offset, size):
        started.append((os.fstat(fd).st_ino, offset, size))  # the file, as the rename into place keeps it

    monkeypatch.setattr(ooc, "_WRITE", 4096)
    monkeypatch.setattr(os, "pwrite", short)
    monkeypatch.setattr(ooc, "start_writeback", writeback)
    out = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out", max_shard_size="30KB")
    files = sorted(p.name for p in expected.iterdir())
    assert all((out / f).read_bytes() == (expected / f).read_bytes() for f in files)
    assert max(calls) == 4096 and min(calls) < 1000  # every call a slice, and the remainders resumed
    for shard in sorted(out.glob("*.safetensors")):
        with open(shard, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        covered = sorted((o, o + n) for inode, o, n in started if inode == shard.stat().st_ino)
        reached = data_start
        for begin, end in covered:
            assert begin <= reached, (shard.name, begin, reached)  # no gap
            reached = max(reached, end)
        assert reached == shard.stat().st_size, shard.name


def test_cli_merge_and_its_bad_input(tmp_path):
    _, spec = checkpoint(tmp_path, torch.float32, False, ["v_proj"])
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    runner = CliRunner()
    args = ["merge", str(spec_file), "--model", str(tmp_path / "base"), "--output", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "o2"), "--max-shard-size", "lots"])
    assert bad.exit_code == 2 and "--max-shard-size" in bad.output
    no_model = runner.invoke(app, [*args[:3], str(tmp_path / "adapter"), "--output", str(tmp_path / "o3")])
    assert no_model.exit_code == 2 and "config.json" in no_model.output
    for threads in ("0", "100000"):  # no threads, or so many that starting them would exhaust the machine
        wrong = runner.invoke(app, [*args[:-1], str(tmp_path / "o4"), "--threads", threads])
        assert wrong.exit_code == 2 and "--threads" in wrong.output and not (tmp_path / "o4").exists()


@pytest.mark.parametrize(("given", "expected"), [([], 2), (["--threads", "1"], 1), (["--threads", "5"], 5)])
def test_cli_merge_threads_are_torch_s_but_the_writer_s_unless_given_and_restored(
    tmp_path, monkeypatch, given, expected
):
    seen = []
    monkeypatch.setattr(ooc, "merge_checkpoint", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        args = ["merge", "spec.json", "--model", str(tmp_path), "--output", str(tmp_path / "out"), *given]
        assert CliRunner().invoke(app, args).exit_code == 0
        assert seen == [expected] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_truncated_or_foreign_shard_is_named(tmp_path):
    """A shard cut short, another format, or a header whose byte ranges do not tile its data as safetensors requires
    (each range the size its shape and dtype take, no overlap, no gap, nothing after the last): any of those would
    copy bytes into the wrong tensor or leave a tensor part zeros, so each is refused, the shard and entry named."""
    _, spec = checkpoint(tmp_path, torch.float32, False, ["q_proj"])
    shard = max((tmp_path / "base").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    (a, b), (_, c) = header[first]["data_offsets"], header[second]["data_offsets"]
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])

    def edited(key, **entry):
        changed = {**header, key: {**header[key], **entry}}
        text = json.dumps(changed, separators=(",", ":")).encode().ljust(length)  # the same length: data in place
        return data[:8] + text + data[8 + length :]

    for content, message in (
        (data[:-4], " is truncated"),
        (b"PK\x03\x04" + bytes(200), " is not a safetensors file"),
        ((1 << 40).to_bytes(8, "little") + data[8:], f" is not a safetensors file (a header of {1 << 40} bytes"),
        (edited(first, shape=[-1, 4]), f": entry '{first}' of its header is malformed"),
        (edited(first, data_offsets=[a, c]), f": entry '{first}' of its header is malformed ({c - a} bytes for F32"),
        (edited(first, shape=[header[first]["shape"][0] * 2, *header[first]["shape"][1:]]), f": entry '{first}'"),
        (edited(second, data_offsets=[a, a + c - b]), f": '{first}' starts at byte {a}, inside '{second}'"),
        (edited(first, data_offsets=[a, a], shape=[0]), f": '{second}' starts {b - a} bytes past the end of '{first}'"),
        (data + bytes(8), f" has 8 bytes after its last tensor, '{last}'"),
    ):
        shard.write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(shard.name + message)):
            ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_broken_index_config_or_shard_list_is_named_and_nothing_is_written(tmp_path):
    """What a careless copy or a hostile folder holds: each refused with the file named, before any output."""
    _, spec = checkpoint(tmp_path, torch.float32, False, ["v_proj"])
    base = tmp_path / "base"
    index, config = base / ooc.INDEX, base / "config.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    first, second = sorted(set(weight_map.values()))[:2]
    outside = tmp_path / "outside.safetensors"
    (base / first).rename(outside)
    (base / first).symlink_to(outside)  # a link to a valid shard is still the shard: allowed
    assert set(tensors(ooc.merge_checkpoint(spec, base, tmp_path / "linked"))) == set(weight_map)
    header = (base / second).read_bytes()
    settings = json.loads(config.read_text())  # a config that is not the weights' (from_pretrained refuses it too)
    cases = [
        (index, "{nope", f"{ooc.INDEX} is not readable JSON"),
        (index, json.dumps({"metadata": {}}), f"{ooc.INDEX} has no weight_map"),
        (index, json.dumps({"weight_map": [first]}), f"{ooc.INDEX} has no weight_map"),
        (index, json.dumps({"weight_map": {"w": 3}}), f"{ooc.INDEX} has no weight_map"),
        (index, json.dumps({"weight_map": {"w": "../base/" + first}}), "names '../base/" + first + "' as a shard"),
        (index, json.dumps({"weight_map": {**weight_map, "w": "gone.safetensors"}}), "gone.safetensors, named in"),
        (index, json.dumps({"weight_map": {**weight_map, "w": "."}}), "names '.' as a shard"),
        (config, "[1, 2]", "config.json is not a JSON object"),
        (config, "\xff\xfe", "config.json is not readable JSON"),
        (config, json.dumps({"model_type": "no-such-model"}), "config.json: transformers cannot build a model"),
        (config, json.dumps({**settings, "vocab_size": settings["vocab_size"] + 8}), "config.json makes model.embed"),
        (base / first, header, f"is stored twice, in {first} and {second}"),  # the second shard's copy
    ]
    for path, content, message in cases:
        before = path.read_bytes()
        path.write_bytes(content if isinstance(content, bytes) else content.encode("latin-1"))
        try:
            with pytest.raises(CheckpointError, match=re.escape(message)):
                ooc.merge_checkpoint(spec, base, tmp_path / "out")
        finally:
            path.write_bytes(before)
        assert not (tmp_path / "out").exists()
    (base / second).unlink()
    (base / second).mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"{second}, named in {ooc.INDEX}, is missing or not a file")):
        ooc.merge_checkpoint(spec, base, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "linked", "outside.safetensors"]


def test_live_adapters_and_routing_are_refused(tmp_path):
    _, spec = checkpoint(tmp_path, torch.float32, False, ["v_proj"])
    fresh = {"type": "lora", "at": {"module": "*.q_proj"}, "seed": 0}
    for bad, field in (
        ({"adapters": {**spec["adapters"], "b": fresh}, "merge": ["a"]}, "merge"),
        ({**spec, "routing": {"adapters": ["a"]}}, "routing"),
    ):
        with pytest.raises(PeftfxError, match=field):
            ooc.merge_checkpoint(bad, tmp_path / "base", tmp_path / "out")
    assert not (tmp_path / "out").exists()
