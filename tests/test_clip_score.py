"""CLIP score against transformers' CLIPModel + CLIPProcessor on a random-weight CLIPModel folder
made here (nothing is downloaded): preprocessing, both towers' features, the score, and the
`diffusion-jax clip-score` command.

Error measure for features: max|ours - reference| / max(1, max|reference|).
"""

import json
import re

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from diffusion_jax import checkpoint, cli
from diffusion_jax.eval import clip_score, fid
from diffusion_jax.tokenizer import CLIPTokenizer

FEATURE_TOL = 1e-5
SCORE_RTOL = 1e-3
# (height, width): the model's 32x32, non-square either way, larger and smaller than the
# 40-pixel shortest edge the folder resizes to before its 32x32 centre crop.
IMAGE_SIZES = [(32, 32), (48, 80), (100, 37), (20, 25), (33, 200), (41, 40)]
CAPTIONS = ["a photo of a cat", "two dogs on a beach", "", "a red car",
            "an oil painting of a lighthouse at dusk, with waves and gulls", "cat"]
PROCESSOR = dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A transformers CLIPModel folder: random weights (LayerNorms perturbed from 1 and 0),
    gelu in the image tower and quick_gelu in the text tower, widths that differ between
    the towers; the bundled CLIP vocabulary; a CLIPImageProcessor config."""
    folder = tmp_path_factory.mktemp("clip")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
        # A direction both towers share, as training makes: the pair scores come out of both
        # signs (16.7, 20.0, -12.8, 13.7, 28.4, 3.6), so that the mean is positive and
        # clamping each pair (13.7) would differ from torchmetrics' clamped mean (11.6).
        for pooled_norm, projection in ((model.vision_model.post_layernorm, model.visual_projection),
                                        (model.text_model.final_layer_norm, model.text_projection)):
            pooled_norm.bias.add_(0.5)
            projection.weight[0] += 0.1
    model.save_pretrained(folder)
    CLIPTokenizer.bundled().save_pretrained(folder)
    transformers.CLIPImageProcessorPil(**PROCESSOR).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(clip_folder):
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessorPil.from_pretrained(clip_folder),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_folder))
    return model, processor


def reference_features(reference, images, captions):
    """transformers' image and text features, as torchmetrics' CLIPScore gets them."""
    model, processor = reference
    inputs = processor(text=captions, images=[Image.fromarray(im) for im in images],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"]).pooler_output
    return image.numpy(), text.numpy()


def reference_score(reference, images, captions):
    """(torchmetrics' CLIPScore, the pair scores): its `_clip_score_update` and `compute`."""
    image, text = (torch.from_numpy(f) for f in reference_features(reference, images, captions))
    image = image / image.norm(p=2, dim=-1, keepdim=True)
    text = text / text.norm(p=2, dim=-1, keepdim=True)
    pairs = 100 * (image * text).sum(axis=-1)
    return float(torch.max(pairs.sum(0) / len(pairs), torch.zeros(()))), pairs.numpy()


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


@pytest.mark.parametrize("config", [
    PROCESSOR,
    dict(size=40, crop_size=32),  # transformers 4's files: ints
    dict(size={"shortest_edge": 24}, crop_size={"height": 32, "width": 32}),  # crop pads
], ids=["shortest_edge", "int_sizes", "padded_crop"])
def test_preprocessing_equals_clip_image_processor(config, tmp_path):
    transformers.CLIPImageProcessorPil(**config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / clip_score.PREPROCESSOR_CONFIG).read_text())
    ours = clip_score.ImageProcessing.from_dict({**saved, **config})
    processor = transformers.CLIPImageProcessorPil.from_pretrained(tmp_path)
    for image in _images():
        expected = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours(image), expected[0].transpose(1, 2, 0), rtol=0,
                                   atol=1e-6, err_msg=f"image {image.shape}")


def test_features_and_score_match_transformers(clip_folder, reference):
    images, pairs = _images(), list(zip(_images(), CAPTIONS))
    scorer = clip_score.load_clip(clip_folder, batch_size=4)  # 6 pairs: the last batch padded
    image_features, text_features = scorer.features(pairs)
    expected_image, expected_text = reference_features(reference, images, CAPTIONS)
    assert rel_err(image_features, expected_image) <= FEATURE_TOL
    assert rel_err(text_features, expected_text) <= FEATURE_TOL

    expected_score, expected_pairs = reference_score(reference, images, CAPTIONS)
    assert expected_score > 1  # a clamped 0 would prove nothing
    np.testing.assert_allclose(scorer.pair_scores(pairs), expected_pairs, rtol=0,
                               atol=SCORE_RTOL * np.abs(expected_pairs).max())
    assert (expected_pairs < 0).any()
    result = clip_score.clip_score([pairs[:5], pairs[5:]], scorer)
    assert result.count == len(pairs) and result.negative == (expected_pairs < 0).sum()
    assert abs(result.score - expected_score) <= SCORE_RTOL * expected_score


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_scores_a_captioned_folder(clip_folder, reference, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "more").mkdir(parents=True)
    names = [f"{i}.png" if i < 4 else f"more/{i}.png" for i in range(len(IMAGE_SIZES))]
    for name, image in zip(names, _images(1)):
        Image.fromarray(image).save(images / name)
    with open(images / "captions.jsonl", "w") as f:
        for name, caption in zip(names[:-1], CAPTIONS):
            f.write(json.dumps({"file": name, "caption": caption}) + "\n")
    (images / names[-1]).with_suffix(".txt").write_text(CAPTIONS[-1])  # a caption beside it

    code, out, err = _run(["clip-score", "--clip", str(clip_folder), "--images", str(images),
                           "--batch-size", "4"], capsys)
    assert code == 0, err
    match = re.fullmatch(r"CLIP score (\S+) \((\d+) images\)\n", out)
    assert match and int(match[2]) == len(names), out
    # The folder source reads files in sorted path order, the order written here.
    expected, _ = reference_score(reference, _images(1), CAPTIONS)
    assert abs(float(match[1]) - expected) <= SCORE_RTOL * expected + 1e-4  # printed to 4 places
    assert "images/s" in err


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from diffusion_jax import system
    from diffusion_jax.bench.weights import random_params
    from diffusion_jax.configs import tiny

    config = tiny.get_config().to_dict()
    params = {tower.name: random_params(tower.kind, config[tower.name], seed)
              for seed, tower in enumerate(system.from_config(config).towers)}
    checkpoint.create(tmp_path / "ckpt", params, config)
    return tmp_path / "ckpt"


def test_cli_scores_a_checkpoint_on_prompts(clip_folder, reference, tiny_checkpoint, tmp_path,
                                            capsys, monkeypatch):
    prompts = ["a photo of a sneaker", "a bag", "", "a dress"]  # the empty line is skipped
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    generated = []
    real_generated_batches = fid.generated_batches

    def recording(*args, **kwargs):
        for images in real_generated_batches(*args, **kwargs):
            generated.extend(images)
            yield images

    monkeypatch.setattr(fid, "generated_batches", recording)
    code, out, err = _run(["clip-score", "--clip", str(clip_folder), "--checkpoint",
                           str(tiny_checkpoint), "--prompts", str(tmp_path / "prompts.txt"),
                           "--steps", "2", "--batch-size", "2"], capsys)
    assert code == 0, err
    match = re.fullmatch(r"CLIP score (\S+) \(3 images\)\n", out)
    assert match, out
    captions = [p for p in prompts if p]
    assert len(generated) == len(captions)
    expected, pairs = reference_score(reference, generated, captions)
    assert abs(float(match[1]) - max(pairs.mean(), 0)) <= SCORE_RTOL * abs(pairs).max() + 1e-4
    assert float(match[1]) == pytest.approx(expected, abs=SCORE_RTOL * abs(pairs).max() + 1e-4)


def _bad_input_folders(tmp_path, clip_folder):
    text_only = tmp_path / "text_encoder"  # an SD text_encoder/: a CLIPTextModel, not a CLIPModel
    text_only.mkdir()
    transformers.CLIPTextConfig(hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=4).save_pretrained(text_only)
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_processor / name).write_bytes((clip_folder / name).read_bytes())
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    for i, image in enumerate(_images()[:3]):
        Image.fromarray(image).save(uncaptioned / f"{i}.png")
    (uncaptioned / "0.txt").write_text("a cat")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "ckpt").mkdir()
    return {"TEXT_ONLY": text_only, "NO_PROCESSOR": no_processor, "UNCAPTIONED": uncaptioned,
            "PROMPTS": tmp_path / "prompts.txt", "CKPT": tmp_path / "ckpt",
            "EMPTY": tmp_path / "ckpt"}


@pytest.mark.parametrize("argv, needle", [
    (["--clip", "MISSING", "--images", "UNCAPTIONED"], "CLIP folder MISSING does not exist"),
    (["--clip", "EMPTY", "--images", "UNCAPTIONED"], "holds no config.json"),
    (["--clip", "TEXT_ONLY", "--images", "UNCAPTIONED"], "is not a CLIPModel folder"),
    (["--clip", "NO_PROCESSOR", "--images", "UNCAPTIONED"], "holds no preprocessor_config.json"),
    (["--clip", "CLIP", "--images", "MISSING"], "image folder MISSING does not exist"),
    (["--clip", "CLIP", "--images", "UNCAPTIONED"], "2 of 3 images have no caption (e.g. 1.png)"),
    (["--clip", "CLIP", "--images", "UNCAPTIONED", "--prompts", "PROMPTS"],
     "--prompts goes with --checkpoint"),
    (["--clip", "CLIP", "--checkpoint", "CKPT"], "--checkpoint needs --prompts FILE"),
    (["--clip", "CLIP", "--checkpoint", "MISSING", "--prompts", "PROMPTS"],
     "--checkpoint MISSING does not exist"),
    (["--clip", "CLIP", "--checkpoint", "CKPT", "--prompts", "MISSING"],
     "--prompts MISSING does not exist"),
])
def test_cli_bad_input_is_one_line_before_loading(argv, needle, clip_folder, tmp_path, capsys,
                                                  monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded weights or generated before checking the input")

    monkeypatch.setattr(clip_score, "load_params", never)
    monkeypatch.setattr(fid, "generated_batches", never)
    paths = {**_bad_input_folders(tmp_path, clip_folder), "CLIP": clip_folder}
    argv = [str(paths.get(a, a)) for a in argv]
    code, out, err = _run(["clip-score", *argv], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("diffusion-jax: error: "), err
    assert needle in err, err


def test_pytorch_model_bin_loads_like_safetensors(clip_folder, tmp_path):
    from flax import traverse_util

    from diffusion_jax.convert import read_safetensors

    for path in clip_folder.iterdir():
        if path.name != "model.safetensors":
            (tmp_path / path.name).write_bytes(path.read_bytes())
    state_dict = read_safetensors(clip_folder / "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()},
               tmp_path / "pytorch_model.bin")  # read back with torch.load(weights_only=True)
    from_bin = clip_score.load_params(clip_score.check_clip_folder(tmp_path))
    from_safetensors = clip_score.load_params(clip_score.check_clip_folder(clip_folder))
    flat_bin, flat_safetensors = (traverse_util.flatten_dict(p) for p in (from_bin, from_safetensors))
    assert flat_bin.keys() == flat_safetensors.keys()
    for key, value in flat_bin.items():
        np.testing.assert_array_equal(value, flat_safetensors[key], err_msg=str(key))


def test_each_process_pairs_its_share_of_the_batches_with_their_prompts(monkeypatch):
    """Process 1 of 2 generates batches 1 and 3 (of 4): its images pair with prompts 2-3 and
    6 (the last batch is short); the pairs come back in order by `parallel.gather_batches`,
    which tests/test_fid.py checks across two real processes."""
    from diffusion_jax import parallel
    from diffusion_jax.eval import fid

    prompts = [f"prompt {i}" for i in range(7)]
    monkeypatch.setattr(parallel, "my_batches", lambda n: range(1, n, 2))

    def fake_batches(checkpoint, prompts, num_samples, *, batch_size, **_):
        for k in parallel.my_batches(-(-num_samples // batch_size)):
            n = min(batch_size, num_samples - k * batch_size)
            yield np.full((n, 4, 4, 3), k, np.uint8)

    monkeypatch.setattr(fid, "generated_batches", fake_batches)
    batches = list(clip_score.generated_pairs("ckpt", prompts, batch_size=2))
    assert [[(int(image[0, 0, 0]), caption) for image, caption in b] for b in batches] == [
        [(1, "prompt 2"), (1, "prompt 3")], [(3, "prompt 6")]]
