"""The compiled graph where its model was: diffusers pipelines, transformers pipelines, diffusers' LoRA scale.

PEFT is the oracle: the same checkpoint injected by PEFT into a copy of the model, used by the same pipeline.
Float32 throughout; live graphs run PEFT's ops in PEFT's order (exact), merged ones sum in another order, so
they are held to 1e-5 relative to the output's magnitude (observed: a few 1e-7).
"""

from __future__ import annotations

import copy
import pickle

import peft
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils.peft_utils import apply_lora_scale
from models import tiny_llama, token_inputs
from oracle import peft_checkpoint
from torch import nn
from torch._dynamo.testing import CompileCounter

import peftfx
from peftfx.dropin import DropIn

MERGED = 1e-5  # relative to the largest output magnitude: a merged weight sums in another order than live


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()


def unet_inputs() -> dict[str, torch.Tensor]:
    """The UNet as StableDiffusionPipeline calls it with guidance: a batch of 2 and a 0-d timestep."""
    g = torch.Generator().manual_seed(2)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
    }


@pytest.fixture(scope="module")
def unet_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[UNet2DConditionModel, nn.Module, str]:
    unet = tiny_unet()
    directory = tmp_path_factory.mktemp("unet_lora")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"]
    oracle = peft_checkpoint(unet, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), directory)
    return unet, oracle.base_model.model, str(directory)


def pipeline(unet: nn.Module, text_encoder: nn.Module | None = None) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_latents(unet: nn.Module, **extra) -> torch.Tensor:
    pipe = pipeline(unet)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return pipe(
            prompt_embeds=torch.randn(1, 5, 16, generator=g),
            negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
            num_inference_steps=3,
            guidance_scale=7.5,
            height=8,
            width=8,
            output_type="latent",
            generator=g,
            **extra,
        ).images


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


def test_stable_diffusion_pipeline_live_and_merged(unet_lora):
    unet, oracle, directory = unet_lora
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    reference = sd_latents(oracle)
    assert not close(sd_latents(unet), reference, 1e-3)  # the adapter moves the latents
    live = peftfx.compile(unet, {"adapters": {"a": {"peft": directory}}}, unet_inputs())
    assert torch.equal(sd_latents(live), reference)
    merged = peftfx.compile(unet, {"adapters": {"a": {"peft": directory}}, "merge": True}, unet_inputs())
    assert close(sd_latents(merged), reference, MERGED)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_cross_attention_scale_is_peft_scale(unet_lora):
    unet, oracle, directory = unet_lora
    x = unet_inputs()
    live = peftfx.compile(unet, {"adapters": {"a": {"peft": directory}}}, x)
    with torch.no_grad():
        for scale in (0.5, torch.tensor(-1.5)):
            reference = oracle(**x, cross_attention_kwargs={"scale": scale}).sample
            assert not close(reference, oracle(**x).sample, 1e-3)
            assert torch.equal(live(**x, cross_attention_kwargs={"scale": scale}).sample, reference)
        assert torch.equal(live(**x, cross_attention_kwargs={"scale": 1.0}).sample, oracle(**x).sample)
    merged = peftfx.compile(unet, {"adapters": {"a": {"peft": directory}}, "merge": True}, x)
    assert [n.target for n in merged.graph.nodes if n.op == "placeholder"] == list(x)  # no scale input left
    merged(**x, cross_attention_kwargs={"scale": 1.0})
    with pytest.raises(peftfx.PeftfxError, match=r"cross_attention_kwargs: scale 0\.5 .*'a' merged"):
        merged(**x, cross_attention_kwargs={"scale": 0.5})


def test_scale_refused_for_kinds_without_one(unet_lora):
    unet = unet_lora[0]
    spec = {"adapters": {"i": {"type": "ia3", "at": {"op": "linear", "module": "*.to_k"}, "seed": 0}}}
    gm = peftfx.compile(unet, spec, unet_inputs())
    gm(**unet_inputs(), cross_attention_kwargs={"scale": 1})
    with pytest.raises(peftfx.PeftfxError, match=r"'i' \(ia3\) cannot be rescaled"):
        gm(**unet_inputs(), cross_attention_kwargs={"scale": 2.0})


def test_sd3_pipeline_transformer(tmp_path):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out"]
    oracle = peft_checkpoint(transformer, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), tmp_path)
    oracle = oracle.base_model.model
    g = torch.Generator().manual_seed(4)
    x = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
        "pooled_projections": torch.randn(2, 8, generator=g),
        "timestep": torch.rand(2, generator=g) * 1000,
    }

    def latents(model: nn.Module) -> torch.Tensor:
        vae = AutoencoderKL(
            block_out_channels=(8,),
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            latent_channels=4,
            norm_num_groups=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        encoders = {f"{part}{i}": None for part in ("text_encoder", "tokenizer") for i in ("", "_2", "_3")}
        pipe = StableDiffusion3Pipeline(
            transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, **encoders
        )
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(5)
        embeds = [torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)]
        pooled = [torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)]
        with torch.no_grad():
            return pipe(
                prompt_embeds=embeds[0],
                negative_prompt_embeds=embeds[1],
                pooled_prompt_embeds=pooled[0],
                negative_pooled_prompt_embeds=pooled[1],
                num_inference_steps=3,
                guidance_scale=5.0,
                height=8,
                width=8,
                output_type="latent",
                generator=g,
            ).images

    reference = latents(oracle)
    live = peftfx.compile(transformer, {"adapters": {"a": {"peft": str(tmp_path)}}}, x)
    assert torch.equal(latents(live), reference)
    merged = peftfx.compile(transformer, {"adapters": {"a": {"peft": str(tmp_path)}}, "merge": True}, x)
    assert close(latents(merged), reference, MERGED)
    with torch.no_grad():
        scaled = oracle(**x, joint_attention_kwargs={"scale": 0.3}).sample
        assert torch.equal(live(**x, joint_attention_kwargs={"scale": 0.3}).sample, scaled)


def test_transformers_pipeline_reads_the_graph(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    words = ["<unk>", "<pad>"] + [f"w{i}" for i in range(62)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    model = tiny_llama()
    oracle = peft_checkpoint(model, peft.LoraConfig(r=4, target_modules="all-linear"), tmp_path).base_model.model
    text = "w1 w5 w9 w3 w7 w2"
    gm = peftfx.compile(model, {"adapters": {"a": {"peft": str(tmp_path)}}}, dict(tokenizer(text, return_tensors="pt")))
    reference = pipeline("feature-extraction", model=oracle, tokenizer=tokenizer)(text, return_tensors=True)
    out = pipeline("feature-extraction", model=gm, tokenizer=tokenizer)(text, return_tensors=True)
    assert torch.equal(out, reference)


def test_model_attributes_without_its_weights():
    model = tiny_llama()
    gm = peftfx.compile(model, {}, token_inputs())
    assert isinstance(gm, torch.fx.GraphModule) and isinstance(gm, DropIn)
    assert gm.config.to_dict() == model.config.to_dict() and gm.config is not model.config
    assert gm.generation_config.to_dict() == model.generation_config.to_dict()
    assert (gm.main_input_name, gm.can_generate(), gm.dtype, gm.device) == (
        "input_ids",
        True,
        torch.float32,
        model.device,
    )
    assert gm.half().dtype == torch.float16  # the graph's own tensors, not the model's
    shell = gm._origin.shell
    assert not list(shell.parameters()) and not list(shell.buffers()) and not list(shell.children())
    with pytest.raises(AttributeError, match="no attribute 'not_there'"):
        _ = gm.not_there


def test_keywords_as_callers_pass_them():
    unet = tiny_unet()
    x = unet_inputs()
    gm = peftfx.compile(unet, {}, x)
    expected = unet(**x).sample
    out = gm(
        x["sample"],
        x["timestep"],
        encoder_hidden_states=x["encoder_hidden_states"],
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
        return_dict=False,
    )
    assert isinstance(out, tuple) and torch.equal(out[0], expected)
    assert torch.equal(gm(**x, return_dict=True).sample, expected)
    with pytest.raises(peftfx.PeftfxError, match=r"'timestep_cond' \(a tensor of shape \[2, 3\]\) was not in the"):
        gm(**x, timestep_cond=torch.zeros(2, 3))
    with pytest.raises(peftfx.PeftfxError, match=r"'encoder_hidden_states' was a tensor in the captured call"):
        gm(x["sample"], x["timestep"])

    fixed = peftfx.compile(unet, {}, {**x, "return_dict": False})
    assert torch.equal(fixed(**x, return_dict=False)[0], expected)
    with pytest.raises(peftfx.PeftfxError, match="captured with return_dict=False"):
        fixed(**x, return_dict=True)
    with pytest.raises(peftfx.PeftfxError, match=r"'encoder_hidden_states' is None, but the graph was captured"):
        fixed(x["sample"], x["timestep"], None)
    assert torch.equal(peftfx.compile(unet, {}, {**x, "return_dict": True})(**x, return_dict=False)[0], expected)


def test_transformers_options_at_their_config_value():
    model = tiny_llama()
    gm = peftfx.compile(model, {}, token_inputs())
    logits = model(**token_inputs()).logits
    out = gm(**token_inputs(), use_cache=False, output_attentions=False, output_hidden_states=False)
    assert torch.equal(out.logits, logits)
    with pytest.raises(peftfx.PeftfxError, match="'output_hidden_states' \\(True\\)"):
        gm(**token_inputs(), output_hidden_states=True)


def test_copies_compile_and_export_keep_the_drop_in(tmp_path):
    model = tiny_llama()
    spec = {"adapters": {"s": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 4, "init": False}}}}
    gm = peftfx.compile(model, spec, token_inputs())
    expected = gm(**token_inputs()).logits
    twin = copy.deepcopy(gm)
    assert isinstance(twin, DropIn) and twin.config.hidden_size == 32
    assert torch.equal(twin(**token_inputs(), return_dict=False)[0], expected)
    explained = torch._dynamo.explain(gm)(**token_inputs(), use_cache=False)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    program = torch.export.export(gm, (), token_inputs(), strict=False)
    torch.export.save(program, tmp_path / "g.pt2")
    assert torch.equal(torch.export.load(tmp_path / "g.pt2").module()(**token_inputs()).logits, expected)
    peftfx.save_adapter(gm, "s", tmp_path / "s")
    traced = peftfx.compile(torch.nn.Sequential(nn.Linear(4, 4)), {}, (torch.randn(2, 4),))
    assert isinstance(pickle.loads(pickle.dumps(traced)), DropIn)


def test_routed_example_inputs_may_hold_adapter_index(tmp_path):
    model = tiny_llama()
    for name in ("x", "y"):
        peft_checkpoint(model, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / name)
    spec = {
        "adapters": {n: {"peft": str(tmp_path / n)} for n in ("x", "y")},
        "routing": {"adapters": ["x", "y"]},
    }
    ids = token_inputs()
    index = torch.tensor([1, -1])
    gm = peftfx.compile(model, spec, {**ids, "adapter_index": index})
    again = peftfx.compile(model, spec, ids)
    assert torch.equal(gm(**ids, adapter_index=index).logits, again(**ids, adapter_index=index).logits)
    with pytest.raises(peftfx.PeftfxError, match="the graph needs input 'adapter_index'"):
        gm(**ids)


def test_dynamic_batch_needs_the_bound_the_error_names():
    unet = tiny_unet()
    x = unet_inputs()
    with pytest.raises(peftfx.CaptureError) as info:
        peftfx.compile(unet, {}, x, dynamic_shapes=peftfx.dynamic_shapes(x))
    message = str(info.value)
    assert message.startswith("torch.export could not capture UNet2DConditionModel: Constraints violated (batch)")
    assert "bounds={'batch': (None, 63)}" in message and "symbolic_trace first" in message.splitlines()[-1]
    gm = peftfx.compile(unet, {}, x, dynamic_shapes=peftfx.dynamic_shapes(x, bounds={"batch": (None, 63)}))
    three = {k: torch.cat([v, v[:1]]) if v.ndim else v for k, v in x.items()}
    assert torch.equal(gm(**three).sample, unet(**three).sample)
    with pytest.raises(peftfx.SpecError, match=r"bounds\.batc: no dynamic dim named 'batc' \(dims: batch\)"):
        peftfx.dynamic_shapes(x, bounds={"batc": (None, 63)})
    with pytest.raises(peftfx.SpecError, match=r"bounds\.batch: the example's sample has size 2 there, outside 3\.\.8"):
        peftfx.dynamic_shapes(x, bounds={"batch": (3, 8)})
    with pytest.raises(peftfx.SpecError, match=r"bounds\.batch: min 9 is above max 8"):
        peftfx.dynamic_shapes(x, bounds={"batch": (9, 8)})


class ScaledBlock(nn.Module):
    """A module whose forward takes diffusers' LoRA scale, as diffusers' own models do (traced symbolically)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    @apply_lora_scale("cross_attention_kwargs")
    def forward(self, x: torch.Tensor, cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        return self.out(torch.relu(self.proj(x)))


def test_scale_is_an_input_under_torch_compile(tmp_path):
    torch.manual_seed(0)
    block, x = ScaledBlock().eval(), torch.randn(2, 8)
    oracle = peft_checkpoint(block, peft.LoraConfig(r=2, target_modules=["proj", "out"]), tmp_path).base_model.model
    gm = peftfx.compile(block, {"adapters": {"a": {"peft": str(tmp_path)}}}, (x,))
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"][-1] == "lora_scale"
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    with torch.no_grad():
        for scale in (0.5, -2.0, 3.0):
            reference = oracle(x, cross_attention_kwargs={"scale": scale})
            assert torch.equal(gm(x, cross_attention_kwargs={"scale": scale}), reference)
            assert torch.equal(compiled(x, cross_attention_kwargs={"scale": torch.tensor(scale)}), reference)
    assert counter.frame_count == 1  # a tensor scale: one graph for every value
    assert torch._dynamo.explain(gm)(x, cross_attention_kwargs={"scale": torch.tensor(0.5)}).graph_break_count == 0


def test_module_inputs_and_unknown_keywords():
    class Activated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
            return act(self.proj(x))

    act, x = nn.ReLU(), torch.randn(2, 3)
    model = Activated()
    gm = peftfx.compile(model, {"capture": "export"}, (x, act))
    assert torch.equal(gm(x, act), model(x, act)) and torch.equal(gm(x=x, act=act), model(x, act))
    with pytest.raises(
        peftfx.PeftfxError, match=r"'act' is ReLU\(\), but the graph was captured with ReLU\(\) \(another"
    ):
        gm(x, nn.ReLU())
    with pytest.raises(peftfx.PeftfxError, match=r"the model takes no argument 'y' \(it takes x, act\)"):
        gm(x, act, y=x)


def test_trainer_evaluation_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    batch = {**token_inputs(), "labels": token_inputs()["input_ids"]}
    spec = {"adapters": {"s": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2, "init": False}}}}
    gm = peftfx.compile(model, spec, batch)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    loss, logits, labels = Trainer(model=gm, args=args).prediction_step(gm, dict(batch), prediction_loss_only=False)
    with torch.no_grad():
        expected = gm(**batch)
    assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)
    assert torch.equal(labels, batch["labels"]) and not torch.equal(logits, model(**batch).logits)
