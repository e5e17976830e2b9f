"""``peftfx merge`` in less memory than the checkpoint: a child process whose private writable memory is capped
(``RLIMIT_DATA``) at 0.4x the checkpoint's size merges it, bit for bit as without the cap, while loading it with
transformers under the same cap is refused.

``RLIMIT_DATA`` (Linux >= 4.7) bounds every private writable mapping: the heap, anonymous ``mmap`` (torch's CPU
tensors, through malloc) and copy-on-write file maps (``safe_open``'s map of a whole shard, the merge's map of one
tensor: a write would turn them into anonymous memory); read-only file maps and the page cache behind ``write``
are not counted. So the cap is "less free memory than the checkpoint" for everything the process could hold of it.
Holding every merged tensor until the end, or reading or writing a whole shard at once, fails under it.
"""

from __future__ import annotations

import copy
import filecmp
import json
import subprocess
import sys

import peft
import pytest
import torch
from test_merge_checkpoint import checkpoint, tensors

from peftfx import out_of_core as ooc

# 8 layers of 768: 222 MiB of float32, its largest tensor 6 MiB; shards (in and out) of up to 100 MB, each larger
# than the cap (0.4x, 89 MiB) but the last, so neither reading nor writing one whole fits in it
SIZES = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "vocab_size": 1024,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD = "100MB"

# The child: a merge of a tiny checkpoint first (every lazy import and cache the merge makes, none of the big
# one's weights), then the cap at its data size now plus the budget; transformers' load is tried, then the merge.
CHILD = """
import json, re, resource, sys
from pathlib import Path
from peftfx import out_of_core
from transformers import AutoModelForCausalLM

args = json.loads(sys.argv[1])
out_of_core.merge_checkpoint(args["warm_spec"], args["warm"], args["warm_out"])
before = int(re.search(r"VmData:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (before + args["budget"], resource.RLIM_INFINITY))
try:
    AutoModelForCausalLM.from_pretrained(args["model"])
    refused = None
except (MemoryError, RuntimeError, OSError) as error:
    refused = f"{type(error).__name__}: {error}"
out_of_core.merge_checkpoint(args["spec"], args["model"], args["out"], max_shard_size=args["shard"])
print(json.dumps({"before": before, "refused": refused}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA counts mmap on Linux only")
def test_a_checkpoint_larger_than_the_memory_cap_merges_as_without_it(tmp_path):
    model, spec = checkpoint(tmp_path, torch.float32, False, TARGETS, shards=SHARD, **SIZES)
    _, warm_spec = checkpoint(tmp_path / "tiny", torch.float32, False, ["q_proj"])
    size = sum(t.nbytes for t in model.state_dict().values())
    free = ooc.merge_checkpoint(spec, tmp_path / "base", tmp_path / "free", max_shard_size=SHARD)
    args = {
        "spec": spec,
        "model": str(tmp_path / "base"),
        "out": str(tmp_path / "capped"),
        "shard": SHARD,
        "budget": int(0.4 * size),
        "warm_spec": warm_spec,
        "warm": str(tmp_path / "tiny" / "base"),
        "warm_out": str(tmp_path / "tiny" / "out"),
    }
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.splitlines()[-1])
    assert report["refused"] is not None, "transformers loaded it under the cap: RLIMIT_DATA is not enforced here"
    assert "Cannot allocate memory" in report["refused"], report
    capped = tmp_path / "capped"
    assert sorted(p.name for p in capped.iterdir()) == sorted(p.name for p in free.iterdir())
    for folder in (tmp_path / "base", capped):
        shards = sorted(s.stat().st_size for s in folder.glob("*.safetensors"))
        assert len(shards) == 3 and shards[1] > args["budget"], shards
    assert all(filecmp.cmp(capped / p.name, p, shallow=False) for p in free.iterdir())  # bit for bit
    written = tensors(capped)
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").merge_and_unload()
    for key, tensor in peft_merged.state_dict().items():
        # float32: PEFT adds a float32 delta, peftfx rounds the exact sum once; they differ in the last bits only
        torch.testing.assert_close(written[key], tensor, rtol=1e-6, atol=1e-7)
    assert not torch.equal(written["model.layers.7.mlp.down_proj.weight"], model.model.layers[7].mlp.down_proj.weight)
