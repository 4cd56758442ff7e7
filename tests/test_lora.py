"""LoRA files at sampling time, against diffusers' `load_lora_weights` + `set_adapters`.

LoRAs are made for the tiny random pipelines of test_pipeline.py (SD 1.x) and
test_sdxl_pipeline.py (SDXL): a PEFT one by peft itself (U-Net and text tower, saved with
diffusers' `save_lora_weights` and its alpha metadata) and kohya ones written here from the
PyTorch module names (alpha != rank, a LoCon 3x3 conv, the text towers; for SDXL the SGM
block names kohya trains with). `diffusion-jax sample --lora FILE:0.8` must give diffusers'
pixels on the same starting latents; each refused file is a test of its message.
"""

import copy
import json

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusion_jax import cli, pipeline  # noqa: E402
from diffusion_jax.convert import lora  # noqa: E402
import test_pipeline as sd  # noqa: E402
import test_sdxl_pipeline as xl  # noqa: E402
from test_sdxl_pipeline import sdxl  # noqa: E402,F401  (the tiny SDXL fixture)

PIXEL_TOLERANCE = 2e-3
STEPS = 5  # and 2 images, as test_pipeline's DDIM run: the same compiled program


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """(diffusers pipeline, converted checkpoint, work dir) of the tiny SD 1.x model."""
    root = tmp_path_factory.mktemp("lora")
    reference = sd._diffusers_pipeline(root / "tokenizer")
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config,
                                                              clip_sample=False)
    reference.save_pretrained(root / "diffusers")
    assert cli.main(["convert", "--from", "diffusers", str(root / "diffusers"),
                     "--out", str(root / "ckpt")]) == 0
    return reference, root / "ckpt", root


def _factors(module: torch.nn.Module, rank: int, generator: torch.Generator,
             magnitude: float = 0.3):
    """Random (down, up) for a Linear or Conv2d."""
    if isinstance(module, torch.nn.Conv2d):
        down = (rank, module.in_channels, *module.kernel_size)
        up = (module.out_channels, rank, 1, 1)
    else:
        down, up = (rank, module.in_features), (module.out_features, rank)
    return (magnitude * torch.randn(down, generator=generator),
            magnitude * torch.randn(up, generator=generator))


def write_kohya(path, towers, seed: int, rename=lambda tower, name: name,
                magnitude: float = 0.3) -> None:
    """A kohya file: {kohya prefix: (model, alpha, [(module name, rank)])}; `rename` gives
    the name kohya writes (SGM's for SDXL's U-Net). One alpha per model: diffusers 0.42
    drops some modules' alpha_pattern entries (attn2 ones, the text tower's mlp), so
    with several it would not be the reference."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, (model, alpha, modules) in towers.items():
        named = dict(model.named_modules())
        for name, rank in modules:
            down, up = _factors(named[name], rank, generator, magnitude)
            key = prefix + rename(prefix, name).replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(float(alpha))})
    safetensors_torch.save_file(state, path)


def _peft_layers(model, config: "peft.LoraConfig", seed: int) -> dict:
    model = peft.inject_adapter_in_model(config, copy.deepcopy(model))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return peft.utils.get_peft_model_state_dict(model)


@pytest.fixture(scope="module")
def sd15_loras(sd15):
    """{name: file}: "peft" (U-Net + text tower, alpha from metadata), "kohya" (alpha !=
    rank, LoCon convs, text tower)."""
    reference, _, root = sd15
    unet_config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    text_config = peft.LoraConfig(r=2, lora_alpha=3, init_lora_weights="gaussian",
                                  target_modules=["q_proj", "v_proj", "fc1"])
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root, weight_name="peft.safetensors",
        unet_lora_layers=_peft_layers(reference.unet, unet_config, 1),
        text_encoder_lora_layers=_peft_layers(reference.text_encoder, text_config, 2),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict())
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    write_kohya(root / "kohya.safetensors", {
        "lora_unet_": (reference.unet, 2, [
            (f"{block}.attn1.to_q", 4), (f"{block}.attn2.to_k", 4),
            (f"{block}.attn2.to_out.0", 2), (f"{block}.ff.net.0.proj", 4),
            ("down_blocks.0.attentions.0.proj_in", 4),  # a 1x1 conv in SD 1.x
            ("down_blocks.0.resnets.0.conv1", 4),  # LoCon: 3x3 conv
            ("up_blocks.1.resnets.1.conv2", 2), ("down_blocks.1.resnets.0.time_emb_proj", 4),
            ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 4)]),
        # (the text tower's MLP only: diffusers 0.42 under transformers 5 drops kohya's
        # self_attn entries, to_k_lora unexpected; test_kohya_and_peft_names_agree has them)
        "lora_te_": (reference.text_encoder, 3, [
            ("encoder.layers.0.mlp.fc1", 4), ("encoder.layers.1.mlp.fc2", 4)])},
        seed=3, rename=lambda prefix, name: (
            name if prefix == "lora_unet_" else "text_model." + name))
    return {"peft": root / "peft.safetensors", "kohya": root / "kohya.safetensors"}


def _reference(pipe, loras, latents, **call):
    """diffusers' images with `loras` ({file: weight}) loaded as adapters, then unloaded."""
    for i, file in enumerate(loras):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=f"a{i}")
    pipe.set_adapters([f"a{i}" for i in range(len(loras))], adapter_weights=list(loras.values()))
    try:
        return pipe(**call, latents=torch.from_numpy(latents), output_type="np").images
    finally:
        pipe.unload_lora_weights()


def _check(name, ours, expected, base, tolerance=PIXEL_TOLERANCE):
    """Our images within `tolerance` of diffusers', the LoRA moving them 10x more."""
    assert ours.shape == expected.shape and ours.dtype == np.float32
    change, error = np.abs(expected - base).max(), np.abs(ours - expected).max()
    print(f"{name}: max pixel error {error:.2e}, the LoRA's change {change:.2e}")
    assert change > 10 * tolerance, "the LoRA hardly changes the images: a weak test"
    assert error <= tolerance, f"{name}: max pixel error {error:.2e}"


SD_CALL = dict(prompt=sd.PROMPT, negative_prompt=sd.NEGATIVE, num_inference_steps=STEPS,
               guidance_scale=7.5, num_images_per_prompt=2, height=sd.SIZE, width=sd.SIZE)
SD_CASES = {"peft": {"peft": 0.8}, "kohya": {"kohya": 0.8},
            "two_at_once": {"peft": 0.8, "kohya": 0.5}}


@pytest.mark.parametrize("case", sorted(SD_CASES))
def test_sd_loras_match_diffusers(sd15, sd15_loras, case):
    reference, ckpt, root = sd15
    loras = {sd15_loras[name]: weight for name, weight in SD_CASES[case].items()}
    latents = sd._latents(1)
    flags = [arg for file, weight in loras.items() for arg in ("--lora", f"{file}:{weight}")]
    ours = sd._sample_cli(root, ckpt, f"lora_{case}", latents, "--sampler", "ddim",
                          "--steps", str(STEPS), *flags)
    base = reference(**SD_CALL, latents=torch.from_numpy(latents), output_type="np").images
    _check(case, ours, _reference(reference, loras, latents, **SD_CALL), base)


def test_a_text_tower_lora_alone_matches_diffusers(sd15, tmp_path):
    reference, ckpt, root = sd15
    file = tmp_path / "text.safetensors"
    write_kohya(file, {"lora_te_": (reference.text_encoder, 2, [
        (f"encoder.layers.{i}.{m}", 4) for i in (0, 1) for m in ("mlp.fc1", "mlp.fc2")])},
        seed=4, rename=lambda _, name: "text_model." + name)
    latents = sd._latents(1)
    ours = sd._sample_cli(root, ckpt, "lora_text", latents, "--sampler", "ddim",
                          "--steps", str(STEPS), "--lora", f"{file}:0.8")
    base = reference(**SD_CALL, latents=torch.from_numpy(latents), output_type="np").images
    _check("text tower", ours, _reference(reference, {file: 0.8}, latents, **SD_CALL), base)


def _sgm(prefix: str, name: str) -> str:
    """The SGM name kohya gives a module of the tiny SDXL U-Net (2 layers per block)."""
    if prefix != "lora_unet_":
        return name
    for diffusers_name, sgm in (("down_blocks.1.attentions.1.", "input_blocks.5.1."),
                                ("down_blocks.2.resnets.0.", "input_blocks.7.0."),
                                ("mid_block.attentions.0.", "middle_block.1."),
                                ("up_blocks.0.attentions.2.", "output_blocks.2.1.")):
        name = name.replace(diffusers_name, sgm)
    name = {"conv_in": "input_blocks.0.0", "conv_out": "out.2"}.get(name, name)
    return name.replace("conv1", "in_layers.2").replace("conv2", "out_layers.3")


def test_an_sdxl_lora_with_both_text_towers_matches_diffusers(sdxl, tmp_path):
    base, ckpt, _, _, root = sdxl
    file = tmp_path / "sdxl.safetensors"
    write_kohya(file, {
        "lora_unet_": (base.unet, 3, [
            ("down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q", 4),
            ("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", 4),
            ("down_blocks.2.resnets.0.conv1", 4), ("down_blocks.2.resnets.0.conv2", 2),
            ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", 4),
            ("up_blocks.0.attentions.2.proj_out", 4), ("conv_in", 4), ("conv_out", 4)]),
        "lora_te1_": (base.text_encoder, 1, [("encoder.layers.1.mlp.fc2", 4),
                                          ("encoder.layers.0.mlp.fc1", 2)]),
        "lora_te2_": (base.text_encoder_2, 2, [("text_model.encoder.layers.1.mlp.fc1", 4),
                                            ("text_model.encoder.layers.0.mlp.fc2", 4)])},
        seed=5, magnitude=1.0, rename=lambda prefix, name: (
            "text_model." + name if prefix == "lora_te1_" else _sgm(prefix, name)))
    keys = safetensors_torch.load_file(file)
    assert "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    latents = xl._latents(1, count=2)
    ours = xl._sample_cli(root, ckpt, "lora_sdxl", latents, "--sampler", "euler",
                          "--lora", f"{file}:0.8")
    base.scheduler = xl._scheduler(base, "euler")
    call = dict(prompt=xl.PROMPT, negative_prompt=xl.NEGATIVE, num_inference_steps=xl.STEPS,
                guidance_scale=xl.GUIDANCE, num_images_per_prompt=2)
    plain = base(**call, latents=torch.from_numpy(latents), output_type="np").images
    # The tiny SDXL's images move little (its U-Net's output is small next to the latents):
    # the SDXL suite's own tolerance, 1e-4, keeps the comparison sharp.
    _check("SDXL", ours, _reference(base, {file: 0.8}, latents, **call), plain, xl.PIXEL_TOLERANCE)


def test_the_png_records_the_loras(sd15, sd15_loras):
    _, ckpt, root = sd15
    out = root / "lora.png"
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--prompt", sd.PROMPT,
                     "--steps", str(STEPS), "--sampler", "ddim", "--num-images", "2",
                     "--height", str(sd.SIZE), "--width", str(sd.SIZE), "--out", str(out),
                     "--lora", str(sd15_loras["kohya"]),
                     "--lora", f"{sd15_loras['peft']}:0.5"]) == 0
    assert json.loads(Image.open(out).text["loras"]) == [
        {"file": str(sd15_loras["kohya"]), "weight": 1.0},
        {"file": str(sd15_loras["peft"]), "weight": 0.5}]


def test_scale_is_weight_times_alpha_over_rank_and_pt_files_read_the_same(sd15_loras, tmp_path):
    read = lora.read(sd15_loras["kohya"])
    q = next(m for m in read.modules if m.name.endswith("attn1_to_q"))
    assert q.kohya and q.tower == "unet" and q.scale == 2 / 4
    peft_file = lora.read(sd15_loras["peft"])
    assert {m.scale for m in peft_file.modules if m.tower == "unet"} == {8 / 4}  # metadata alpha
    assert {m.scale for m in peft_file.modules if m.tower == "text_encoder"} == {3 / 2}
    torch.save(safetensors_torch.load_file(sd15_loras["kohya"]), tmp_path / "kohya.pt")
    from_pt = lora.read(tmp_path / "kohya.pt")
    assert [(m.key, m.scale) for m in from_pt.modules] == [(m.key, m.scale) for m in read.modules]
    for a, b in zip(from_pt.modules, read.modules):
        np.testing.assert_array_equal(a.down, b.down)


def test_kohya_peft_and_old_diffusers_names_agree(sd15, sdxl, tmp_path):
    """The same factors under kohya names (the U-Net's SGM ones for SDXL; the text towers'
    self_attn, which diffusers cannot load from kohya files here), PEFT names (in a pickled
    .pt file) and diffusers' older names (.lora.down, .lora_linear_layer.down, the
    attention processors' to_k_lora) merge into the same params."""
    from diffusion_jax import checkpoint

    rng = np.random.default_rng(0)
    factors = lambda rows, cols: {"down": rng.standard_normal((4, cols)),
                                  "up": rng.standard_normal((rows, 4))}
    te, xl_block = "text_model.encoder.layers", "down_blocks.1.attentions.1.transformer_blocks.0"
    cases = [(sd15[1], {  # (kohya, PEFT, old diffusers with {} for down / up): factors
        (f"lora_te_{te.replace('.', '_')}_0_self_attn_k_proj",
         f"text_encoder.{te}.0.self_attn.k_proj",
         f"text_encoder.{te}.0.self_attn.to_k_lora.{{}}.weight"): factors(32, 32),
        (f"lora_te_{te.replace('.', '_')}_1_mlp_fc1", "text_encoder.encoder.layers.1.mlp.fc1",
         f"text_encoder.{te}.1.mlp.fc1.lora_linear_layer.{{}}.weight"): factors(37, 32)}),
        (sdxl[1], {
        ("lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_v",
         f"unet.{xl_block}.attn2.to_v",
         f"unet.{xl_block}.attn2.processor.to_v_lora.{{}}.weight"): factors(64, 48),
        ("lora_unet_output_blocks_2_0_skip_connection", "unet.up_blocks.0.resnets.2.conv_shortcut",
         "unet.up_blocks.0.resnets.2.conv_shortcut.lora.{}.weight"): {
             "down": rng.standard_normal((4, 128, 1, 1)), "up": rng.standard_normal((64, 4, 1, 1))},
        (f"lora_te2_{te.replace('.', '_')}_1_self_attn_out_proj",
         f"text_encoder_2.{te}.1.self_attn.out_proj",
         f"text_encoder_2.{te}.1.self_attn.to_out_lora.{{}}.weight"): factors(32, 32)})]
    for ckpt, modules in cases:
        kohya = _state(tmp_path / "kohya.safetensors", {
            f"{k}.lora_{part}.weight": v[part] for (k, _, _), v in modules.items() for part in v}
            | {f"{k}.alpha": np.float32(2) for k, _, _ in modules})  # alpha 2 / rank 4
        peft_file = tmp_path / "peft.pt"  # read with torch.load(weights_only=True)
        torch.save({f"{p}.lora_{'A' if part == 'down' else 'B'}.weight": torch.as_tensor(
            v[part] / (2 if part == "up" else 1), dtype=torch.float32)  # alpha = rank, up / 2
            for (_, p, _), v in modules.items() for part in v}, peft_file)
        old = _state(tmp_path / "old.safetensors", {
            o.format(part): v[part] / (2 if part == "up" else 1)
            for (_, _, o), v in modules.items() for part in v})
        params, config, _ = checkpoint.load_models(ckpt)
        merged = [lora.merge(params, config, [(lora.read(file), 0.7)])
                  for file in (kohya, peft_file, old)]
        changed = 0
        for tower in params:
            for x, y, z, base in zip(*(jax.tree.leaves(t[tower]) for t in (*merged, params))):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(x, z, rtol=1e-6, atol=1e-6)
                changed += not np.array_equal(x, base)
        assert changed == len(modules)


# ----------------------------------------------------------------------------- refusals


def _state(path, entries):
    safetensors_torch.save_file({k: torch.as_tensor(v, dtype=torch.float32)
                                 for k, v in entries.items()}, path)
    return path


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _lora(down=(4, 32), up=(32, 4)):
    return {"lora_down.weight": torch.zeros(down), "lora_up.weight": torch.zeros(up)}


@pytest.mark.parametrize("marker, kind", [
    (f"{Q}.dora_scale", "DoRA"), (f"{Q}.hada_w1_a", "LoHa"), (f"{Q}.lokr_w1", "LoKr"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector",
     "DoRA")])
def test_unsupported_kinds_are_refused(tmp_path, marker, kind):
    file = _state(tmp_path / "x.safetensors", {
        **{f"{Q}.{k}": v for k, v in _lora().items()}, marker: torch.ones(4)})
    with pytest.raises(ValueError, match=rf"{kind}.* is not supported \({marker}\)"):
        lora.read(file)


def test_keys_of_no_known_format_are_refused(tmp_path):
    file = _state(tmp_path / "x.safetensors", {"model.diffusion_model.out.2.weight": torch.ones(2)})
    with pytest.raises(ValueError, match=r"1 of 1 keys are not LoRA factors of a known format "
                                         r"\(model.diffusion_model.out.2.weight\); expected kohya"):
        lora.read(file)


def test_modules_matching_no_layer_are_refused(sd15, tmp_path):
    _, ckpt, _ = sd15
    typo = Q.replace("to_q", "to_qq")
    file = _state(tmp_path / "x.safetensors", {
        **{f"{Q}.{k}": v for k, v in _lora().items()},
        **{f"{typo}.{k}": v for k, v in _lora().items()}})
    with pytest.raises(ValueError, match=(
            rf"1 of 2 modules match no layer of this checkpoint \(1 matched\), e.g. {typo}; "
            r"its layers are named like lora_unet_down_blocks_0_attentions_0_transformer_blocks"
            r"_0_attn1_to_q.lora_down.weight")):
        pipeline.load(ckpt, loras=[(file, 1.0)], cache_dir=None)


def test_python_loras_are_file_weight_pairs(sd15, sd15_loras):
    with pytest.raises(ValueError, match=r"give \(file, weight\) pairs, e.g. "):
        pipeline.load(sd15[1], loras=[str(sd15_loras["kohya"])], cache_dir=None)


def test_a_shape_mismatch_names_the_key(sd15, tmp_path):
    _, ckpt, _ = sd15
    file = _state(tmp_path / "x.safetensors",
                  {f"{Q}.{k}": v for k, v in _lora(down=(4, 31)).items()})
    with pytest.raises(ValueError, match=rf"{Q} has shapes down \(4, 31\), up \(32, 4\), which do "
                                         r"not make that layer's \(32, 32\) weight"):
        pipeline.load(ckpt, loras=[(file, 1.0)], cache_dir=None)


def test_a_lora_for_another_family_says_so(sd15, sd15_loras, sdxl, tmp_path):
    _, sd_ckpt, _ = sd15
    _, xl_ckpt, _, refiner_ckpt, _ = sdxl
    # SD 1.x's LoRA on SDXL: its cross-attention reads the 32-wide CLIP features, SDXL's 48.
    with pytest.raises(ValueError, match=r"is for another model family: its cross-attention reads "
                                         r"32-wide text features .*attn2_to_k\), this checkpoint's "
                                         r"U-Net 48-wide ones"):
        pipeline.load(xl_ckpt, loras=[(sd15_loras["kohya"], 1.0)], cache_dir=None)
    te2 = _state(tmp_path / "te2.safetensors", {
        f"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.{k}": v
        for k, v in _lora(down=(4, 32), up=(32, 4)).items()})
    with pytest.raises(ValueError, match=(
            r"another model family: lora_te2_text_model_encoder_layers_0_self_attn_q_proj "
            r"addresses text_encoder_2, which this checkpoint does not have \(it has unet, vae, "
            r"text_encoder\)")):
        pipeline.load(sd_ckpt, loras=[(te2, 1.0)], cache_dir=None)
    te1 = _state(tmp_path / "te1.safetensors", {
        f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{k}": v
        for k, v in _lora(down=(4, 16), up=(16, 4)).items()})
    with pytest.raises(ValueError, match=r"addresses text_encoder, which this checkpoint does not "
                                         r"have \(it has unet, vae, text_encoder_2\)"):
        pipeline.load(refiner_ckpt, loras=[(te1, 1.0)], cache_dir=None)


@pytest.mark.parametrize("spec, message", [
    ("{missing}:0.8", "LoRA file {missing} does not exist"),
    ("{file}:strong", "'strong' is not a number and {file}:strong is not a file; give FILE"),
    ("{file}:nan", "the weight must be a finite number")])
def test_lora_flags_are_checked_before_the_checkpoint_loads(capsys, tmp_path, spec, message):
    file = _state(tmp_path / "x.safetensors", {f"{Q}.{k}": v for k, v in _lora().items()})
    names = dict(missing=tmp_path / "missing.safetensors", file=file)
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "no-checkpoint"), "--prompt", "a",
                     "--out", str(tmp_path / "x.png"), "--lora", spec.format(**names)]) != 0
    assert message.format(**names) in capsys.readouterr().err


def test_a_bad_lora_file_fails_before_the_checkpoint_loads(capsys, tmp_path):
    file = _state(tmp_path / "x.safetensors", {f"{Q}.{k}": v for k, v in _lora().items()} | {
        f"{Q}.hada_w1_a": torch.ones(2)})
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "no-checkpoint"), "--prompt", "a",
                     "--out", str(tmp_path / "x.png"), "--lora", str(file)]) != 0
    assert "LoHa (LyCORIS) is not supported" in capsys.readouterr().err
