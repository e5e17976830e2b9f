"""Generation with a KV cache: ``peftfx.generate`` on graphs captured with ``max_cache_len``, against PEFT's
``generate``.

The oracle is transformers' own loop on the PEFT model (``do_sample=False``; its dynamic cache). Greedy tokens must
be **identical**: live, merged (also ``inplace``) and folded adapters, Llama, GPT-2 and Mistral with a sliding
window shorter than the text, a batch of left-padded ragged prompts, and routed batches against ``adapter_names``.
Sampling draws from a ``torch.Generator`` seeded as transformers' global generator is, so it gives transformers'
tokens too. Compiled: the decode step compiles once, for every step, routing and swap. ONNX: one file (the prompt
and every step) drives the same loop in onnxruntime, and serves two adapters fed as inputs.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import tiny_bert, tiny_llama
from oracle import assert_unchanged, peft_checkpoint, snapshot
from torch._dynamo.testing import CompileCounterWithBackend

import peftfx

LENGTH, NEW = 16, 8
IDS = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])  # ragged, left-padded
PADDED = IDS.masked_fill(MASK == 0, 0)
CONFIGS = {
    "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "b": peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base Llama, two checkpoints of different ranks on the same sites, and PEFT holding both."""
    base = tiny_llama()
    root = tmp_path_factory.mktemp("generate")
    for i, (name, config) in enumerate(CONFIGS.items()):
        peft_checkpoint(base, config, root / name, lambda m, seed=i: _perturb(m, seed))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / "a", adapter_name="a").eval()
    peft_model.load_adapter(root / "b", adapter_name="b")
    return base, root, peft_model


def _perturb(model, seed):
    from oracle import perturb

    perturb(model, scale=0.3, seed=seed)


def peft_tokens(model, ids=PADDED, mask=MASK, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs
        )


def adapters(root, **extra):
    return {name: {"peft": str(root / name), **extra.get(name, {})} for name in CONFIGS}


@pytest.fixture(scope="module")
def live(setup):
    base, root, _ = setup
    return peftfx.compile(base, {"adapters": adapters(root), "active": ["a"]}, {"input_ids": IDS}, max_cache_len=LENGTH)


def test_live_adapter_matches_peft_and_the_model_is_untouched(setup, live):
    base, _, peft_model = setup
    peft_model.set_adapter("a")
    want = peft_tokens(peft_model)
    assert want.shape == (3, 6 + NEW)
    assert torch.equal(peftfx.generate(live, PADDED, max_new_tokens=NEW, attention_mask=MASK), want)
    assert not torch.equal(want, peft_tokens(base)), "the adapter changes no token: a vacuous test"
    before = snapshot(base)
    peftfx.compile(base, {}, {"input_ids": IDS}, max_cache_len=LENGTH)
    assert_unchanged(base, before)
    assert base.config.use_cache and type(base).__name__ == "LlamaForCausalLM" and "forward" not in vars(base)


def test_the_prompt_runs_once_then_one_token_per_step(live):
    class Spy:
        def __init__(self, gm):
            self._orig_mod, self.calls = gm, []

        def __call__(self, **inputs):
            self.calls.append((tuple(inputs["input_ids"].shape), inputs["cache_position"].tolist()))
            return self._orig_mod(**inputs)

    spy = Spy(live)
    peftfx.generate(spy, PADDED, max_new_tokens=4, attention_mask=MASK, eos_token_id=[])
    assert spy.calls == [((3, 6), [0, 1, 2, 3, 4, 5]), ((3, 1), [6]), ((3, 1), [7]), ((3, 1), [8])]


@pytest.mark.parametrize("form", ["merged", "folded"])
def test_merged_and_folded_adapters_match_peft(setup, form):
    base, root, peft_model = setup
    spec = {"adapters": adapters(root), "active": ["a"], "merge": True}
    reference = peft_model
    if form == "folded":
        spec["adapters"]["mix"] = {"combine": ["a", "b"], "weights": [1.0, -0.5], "method": "cat"}
        spec["active"] = ["mix"]
        reference = copy.deepcopy(peft_model)
        reference.add_weighted_adapter(["a", "b"], [1.0, -0.5], "mix", combination_type="cat")
    reference.set_adapter(spec["active"][0])
    gm = peftfx.compile(base, spec, {"input_ids": IDS}, max_cache_len=LENGTH)
    assert not any(name.startswith("peftfx.") for name, _ in gm.named_parameters())
    assert torch.equal(peftfx.generate(gm, PADDED, max_new_tokens=NEW, attention_mask=MASK), peft_tokens(reference))


@pytest.fixture(scope="module")
def routed(setup):
    base, root, _ = setup
    spec = {"adapters": adapters(root), "routing": {"adapters": ["a", "b"]}}
    return peftfx.compile(base, spec, {"input_ids": IDS}, max_cache_len=LENGTH)


def test_routed_batch_matches_peft_adapter_names(setup, routed):
    _, _, peft_model = setup
    gm = routed
    for names in (["a", "__base__", "b"], ["b", "b", "a"]):
        index = [{"a": 0, "b": 1}.get(n, -1) for n in names]
        got = peftfx.generate(gm, PADDED, max_new_tokens=NEW, attention_mask=MASK, adapter_index=index)
        assert torch.equal(got, peft_tokens(peft_model, adapter_names=names)), names


def test_sampling_draws_as_transformers_does(setup, live):
    _, _, peft_model = setup
    peft_model.set_adapter("a")
    warpers = {"temperature": 0.7, "top_k": 20, "top_p": 0.9}
    torch.manual_seed(3)
    with torch.no_grad():
        want = peft_model.generate(
            input_ids=PADDED, attention_mask=MASK, max_new_tokens=NEW, do_sample=True, pad_token_id=0, **warpers
        )
    generator = torch.Generator().manual_seed(3)
    got = peftfx.generate(
        live, PADDED, max_new_tokens=NEW, attention_mask=MASK, do_sample=True, generator=generator, **warpers
    )
    assert torch.equal(got, want)
    assert not torch.equal(got, peft_tokens(peft_model)), "sampling gave the greedy tokens"


def test_eos_finishes_rows_as_transformers_does(setup, live):
    _, _, peft_model = setup
    peft_model.set_adapter("a")
    greedy = peft_tokens(peft_model)
    eos = int(greedy[0, 8])  # row 0 ends early; others run on or end later
    want = peft_tokens(peft_model, eos_token_id=eos)
    got = peftfx.generate(live, PADDED, max_new_tokens=NEW, attention_mask=MASK, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[0, 9:] == 0).all()


def wide_gpt2() -> torch.nn.Module:
    """A GPT-2 with a wide init, so the random model does not repeat one token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_gpt2_and_a_sliding_window_match_peft(family, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    if family == "gpt2":
        base, targets = wide_gpt2(), ["c_attn", "c_fc"]
    else:
        torch.manual_seed(0)  # the window (3) is shorter than every text: the mask, not the cache, must forget
        config = MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            sliding_window=3,
        )
        base, targets = MistralForCausalLM(config).eval(), ["q_proj", "v_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2")
    peft_model = peft_checkpoint(base, config, tmp_path / "a", lambda m: _perturb(m, 0))
    gm = peftfx.compile(base, {"adapters": {"a": {"peft": str(tmp_path / "a")}}}, {"input_ids": IDS}, max_cache_len=16)
    want = peft_tokens(peft_model)
    assert torch.equal(peftfx.generate(gm, PADDED, max_new_tokens=NEW, attention_mask=MASK), want)
    if family == "mistral":
        full = copy.deepcopy(peft_model)
        full.config.sliding_window = None
        full.base_model.model.config.sliding_window = None
        assert not torch.equal(peft_tokens(full), want), "the window changes no token: a vacuous test"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_inplace_merge_generates_as_peft_merged_and_the_default(family, tmp_path):
    """``inplace=True`` with ``max_cache_len``: the step graph's merged weights are the model's own tensors, its
    tokens those of PEFT's merge_and_unload and of the default merge, which leaves the model untouched."""
    if family == "llama":
        base, targets, site = tiny_llama(), ["q_proj", "v_proj", "up_proj"], "model.layers.0.self_attn.q_proj"
    else:
        base, targets, site = wide_gpt2(), ["c_attn", "c_fc"], "transformer.h.0.attn.c_attn"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2")
    peft_model = peft_checkpoint(base, config, tmp_path / "a", lambda m: _perturb(m, 0))
    want = peft_tokens(peft_model.merge_and_unload())
    assert not torch.equal(want, peft_tokens(base)), "the adapter changes no token: a vacuous test"
    spec, inputs = {"adapters": {"a": {"peft": str(tmp_path / "a")}}, "merge": True}, {"input_ids": IDS}
    before = snapshot(base)
    default = peftfx.compile(base, spec, inputs, max_cache_len=LENGTH)
    assert_unchanged(base, before)
    storage = base.get_submodule(site).weight.data_ptr()
    inplace = peftfx.compile(base, spec, inputs, max_cache_len=LENGTH, inplace=True)
    merged = inplace.get_submodule(site).weight
    assert merged.data_ptr() == storage and torch.equal(base.get_submodule(site).weight, merged)
    assert not torch.equal(merged, before[f"{site}.weight"])
    assert all(torch.equal(inplace.state_dict()[k], t) for k, t in default.state_dict().items())
    for gm in (default, inplace):
        assert torch.equal(peftfx.generate(gm, PADDED, max_new_tokens=NEW, attention_mask=MASK), want)


def test_compiled_decode_step_never_recompiles(setup):
    """Routed adapters and an always-on one with max_rank; steps, routings and a swap reuse one compiled step."""
    base, root, _ = setup
    spec = {
        "adapters": {**adapters(root), "c": {"peft": str(root / "a"), "max_rank": 8}},
        "routing": {"adapters": ["a", "b"]},
        "active": ["c", "a", "b"],
    }
    gm = peftfx.compile(base, spec, {"input_ids": IDS}, max_cache_len=LENGTH)
    eager = {}
    for routing in ([0, -1, 1], [1, 1, -1]):
        eager[tuple(routing)] = peftfx.generate(
            gm, PADDED, max_new_tokens=NEW, attention_mask=MASK, adapter_index=routing
        )
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    for routing, want in eager.items():
        got = peftfx.generate(compiled, PADDED, max_new_tokens=NEW, attention_mask=MASK, adapter_index=list(routing))
        assert torch.equal(got, want)
    assert counter.frame_count == 2, "one prefill and one decode step, for every step and routing"
    peftfx.swap_adapter(gm, "c", root / "b")
    swapped = peftfx.generate(compiled, PADDED, max_new_tokens=NEW, attention_mask=MASK, adapter_index=[0, -1, 1])
    assert counter.frame_count == 2, "swap_adapter recompiled"
    assert torch.equal(
        swapped, peftfx.generate(gm, PADDED, max_new_tokens=NEW, attention_mask=MASK, adapter_index=[0, -1, 1])
    )
    assert not torch.equal(swapped, eager[0, -1, 1])


def test_onnx_file_generates_and_serves_two_adapters(setup, tmp_path):
    import onnxruntime as ort

    base, root, peft_model = setup
    spec = {"adapters": adapters(root, a={"max_rank": 8, "as_inputs": True}), "active": ["a"]}
    gm = peftfx.compile(base, spec, {"input_ids": IDS}, max_cache_len=LENGTH)
    path = peftfx.export_onnx(gm, peftfx.step_inputs(gm, IDS), tmp_path / "step.onnx")
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    assert names[:6] == ["input_ids", "attention_mask", "position_ids", "cache_position", *_past(0)]
    assert [o.name for o in session.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]
    for adapter in ("a", "b"):
        if adapter == "b":
            peftfx.swap_adapter(gm, "a", root / "b")
        peft_model.set_adapter(adapter)
        feeds = peftfx.adapter_inputs(gm)
        got = peftfx.generate(session, PADDED, max_new_tokens=NEW, attention_mask=MASK, feeds=feeds)
        assert torch.equal(got, peft_tokens(peft_model)), adapter


def test_onnx_file_of_a_routed_graph_takes_adapter_index(setup, routed, tmp_path):
    import onnxruntime as ort

    _, _, peft_model = setup
    path = peftfx.export_onnx(routed, peftfx.step_inputs(routed, IDS), tmp_path / "routed.onnx")
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()][-1] == "adapter_index"
    names = ["b", "__base__", "a"]
    got = peftfx.generate(session, PADDED, max_new_tokens=NEW, attention_mask=MASK, adapter_index=[1, -1, 0])
    assert torch.equal(got, peft_tokens(peft_model, adapter_names=names))


def _past(layer):
    return [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]


def test_errors_name_the_numbers_before_any_work(setup, live, routed):
    base, _, _ = setup
    with pytest.raises(peftfx.GenerationError, match=r"6 tokens plus max_new_tokens=11 is 17 .* max_cache_len=16"):
        peftfx.generate(live, IDS, max_new_tokens=11)
    with pytest.raises(peftfx.GenerationError, match=r"batch 2, but the graph was captured for batch 3"):
        peftfx.generate(live, IDS[:2], max_new_tokens=2)
    with pytest.raises(peftfx.GenerationError, match=r"attention_mask is \[3, 5\], input_ids is \[3, 6\]"):
        peftfx.generate(live, IDS, max_new_tokens=2, attention_mask=MASK[:, 1:])
    with pytest.raises(peftfx.GenerationError, match="not routed"):
        peftfx.generate(live, IDS, max_new_tokens=2, adapter_index=[0, 0, 0])
    with pytest.raises(peftfx.GenerationError, match="max_new_tokens=0"):
        peftfx.generate(live, IDS, max_new_tokens=0)
    with pytest.raises(peftfx.GenerationError, match="not a graph captured with max_cache_len"):
        peftfx.generate(peftfx.compile(tiny_llama(), {}, {"input_ids": IDS}), IDS, max_new_tokens=2)
    with pytest.raises(peftfx.CaptureError, match="BertForSequenceClassification is not a decoder-only"):
        peftfx.compile(tiny_bert(), {}, {"input_ids": IDS}, max_cache_len=LENGTH)
    with pytest.raises(peftfx.GenerationError, match=r"input_ids hold \d+\.\.64, outside the vocabulary 0\.\.63"):
        peftfx.generate(live, IDS.clamp(max=61) + 3, max_new_tokens=2)
    with pytest.raises(peftfx.GenerationError, match=r"adapter_index has shape \[2\]; the batch is 3"):
        peftfx.generate(routed, IDS, max_new_tokens=2, adapter_index=[0, 1])
    with pytest.raises(peftfx.GenerationError, match="temperature"):
        peftfx.generate(live, IDS, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(peftfx.SpecError, match="symbolic_trace cannot capture a KV cache"):
        peftfx.compile(base, {"capture": "symbolic_trace"}, {"input_ids": IDS}, max_cache_len=LENGTH)
    with pytest.raises(peftfx.GenerationError, match="prompt has 6 tokens, more than max_cache_len=4"):
        peftfx.compile(base, {}, {"input_ids": IDS}, max_cache_len=4)
