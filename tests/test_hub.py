"""Hub ids resolved through huggingface_hub's cache, offline: the tests lay out a cache folder themselves.

The layout is huggingface_hub's (``models--<owner>--<name>/snapshots/<commit>/`` and ``refs/<branch>``); the hub
is never contacted: HF_HUB_OFFLINE is set for every test here, and the cache is the test's own folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import peft
import pytest
import torch
from models import tiny_llama, token_inputs
from oracle import peft_checkpoint

import peftfx
from peftfx.model_ref import ModelRef, load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def publish(cache: Path, repo: str, folder: Path, subfolder: str = "", branch: str = "main") -> None:
    """Put ``folder`` into the cache as ``repo``'s snapshot at ``branch`` (under ``subfolder``)."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / COMMIT / subfolder, dirs_exist_ok=True)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / branch).write_text(COMMIT)


def test_peft_hub_id_with_subfolder_and_revision(cache, tmp_path):
    model = tiny_llama()
    peft_checkpoint(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "local")
    publish(cache, "someone/loras", tmp_path / "local", subfolder="style", branch="v1")
    local = peftfx.compile(model, {"adapters": {"a": {"peft": str(tmp_path / "local")}}}, token_inputs())
    hub = {"peft": "someone/loras", "subfolder": "style", "revision": "v1"}
    gm = peftfx.compile(model, {"adapters": {"a": hub}}, token_inputs())
    assert torch.equal(gm(**token_inputs()).logits, local(**token_inputs()).logits)
    assert not torch.equal(gm(**token_inputs()).logits, model(**token_inputs()).logits)
    report = peftfx.verify(model, {"adapters": {"a": hub}}, token_inputs())
    assert report.ok and any(r.check == "live vs PEFT" for r in report.rows), report

    with pytest.raises(peftfx.CheckpointError, match=r"adapters\.a\.peft: hub id 'someone/loras' is not in the cache"):
        peftfx.compile(model, {"adapters": {"a": {"peft": "someone/loras"}}}, token_inputs())  # no main branch
    missing = {"peft": "someone/other", "revision": "v2"}
    with pytest.raises(peftfx.CheckpointError, match=r"'someone/other' at revision 'v2' is not in the cache .*OFFLINE"):
        peftfx.compile(model, {"adapters": {"a": missing}}, token_inputs())
    wrong = {**hub, "subfolder": "styl"}
    with pytest.raises(peftfx.CheckpointError, match=r"'someone/loras' at revision 'v1' has no subfolder 'styl'"):
        peftfx.compile(model, {"adapters": {"a": wrong}}, token_inputs())


def test_model_path_hub_id(cache, tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    publish(cache, "someone/tiny-llama", tmp_path / "llama")
    loaded, _ = load_model(ModelRef(path="someone/tiny-llama"))
    assert torch.equal(loaded(**token_inputs()).logits, model(**token_inputs()).logits)
    with pytest.raises(peftfx.CheckpointError, match=r"model\.path: hub id 'someone/absent' is not in the cache"):
        load_model(ModelRef(path="someone/absent"))
