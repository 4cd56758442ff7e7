"""`diffusion-jax bench`: every benchmark end to end on configs/tiny.py, the PyTorch
comparisons doing the same work (outputs within 1e-4 relative: max|ours - torch| /
max(1, max|torch|)), XLA's FLOP counts against analytic ones, and usage errors."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import bench, cli, config_files
from diffusion_jax.bench import measure

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")
COMMON_KEYS = {"median_s", "images_per_s", "flops", "flops_source", "flop_per_s",
               "matmul_peak_flop_per_s", "fraction_of_matmul_peak", "compile_s",
               "peak_rss_bytes", "xla_total_bytes", "platform", "device_kind", "jax_version",
               "cpu_count"}
TORCH_KEYS = {"torch_median_s", "torch_images_per_s", "torch_threads", "ratio_vs_torch"}


def _bench(capsys, tmp_path, *argv) -> dict:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", *argv, "--config", TINY, "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for key in result:  # the table shows every figure the JSON holds
        assert key in printed
    return result


def _check_common(result: dict, batch: int) -> None:
    assert COMMON_KEYS <= set(result)
    assert result["batch"] == batch and result["flops_source"] == "xla_cost_analysis"
    assert result["median_s"] > 0 and result["compile_s"] > 0 and result["flops"] > 0
    assert result["images_per_s"] == pytest.approx(batch / result["median_s"])
    assert result["flop_per_s"] == pytest.approx(result["flops"] / result["median_s"])
    assert 0 < result["fraction_of_matmul_peak"] < 1.5
    assert result["peak_rss_bytes"] > 100 * 2 ** 20 and result["xla_total_bytes"] > 0


def _check_torch(result: dict) -> None:
    assert TORCH_KEYS <= set(result)
    assert result["ratio_vs_torch"] == pytest.approx(
        result["images_per_s"] / result["torch_images_per_s"])


@pytest.mark.parametrize("what, shape_key", [("unet", "latent_shape"), ("vae", "image_shape")])
def test_forward_benchmarks_match_torch(capsys, tmp_path, what, shape_key):
    result = _bench(capsys, tmp_path, what, "--batch", "2", "--compare", "torch")
    _check_common(result, batch=2)
    _check_torch(result)
    assert result["benchmark"] == what and result[shape_key][0] == 2
    print(f"{what}: relative difference {result['relative_difference']:.2e}")
    assert 0 < result["relative_difference"] < 1e-4


def test_train_step_matches_torch(capsys, tmp_path):
    result = _bench(capsys, tmp_path, "train", "--batch", "2", "--compare", "torch")
    _check_common(result, batch=2)
    _check_torch(result)
    # A real step: the loss moved, the same way as torch's AdamW moved it.
    assert abs(result["last_loss"] - result["first_loss"]) > 1e-3
    print(f"train: loss difference {result['loss_difference']:.2e}")
    assert result["loss_difference"] < 1e-4 * max(1.0, result["torch_first_loss"])
    assert result["xla_alias_bytes"] > 0  # the donated state is updated in place


def test_lora_train_step_matches_diffusers_with_peft(capsys, tmp_path):
    """bench train --lora: the optimizer holds the attention factors alone (PEFT's layers on
    the torch side, holding the same factors): the same losses, far fewer trained params
    and a smaller state than the full step's."""
    full = _bench(capsys, tmp_path, "train", "--batch", "2")
    result = _bench(capsys, tmp_path, "train", "--batch", "2", "--lora", "2", "--compare",
                    "torch")
    _check_common(result, batch=2)
    _check_torch(result)
    assert result["lora_rank"] == 2 and full["lora_rank"] is None
    assert 0 < result["trained_params"] < full["trained_params"] / 10
    assert result["xla_argument_bytes"] < full["xla_argument_bytes"]  # no AdamW moments of W
    assert abs(result["last_loss"] - result["first_loss"]) > 1e-4  # the factors moved
    assert result["loss_difference"] < 1e-4 * max(1.0, result["torch_first_loss"])


@pytest.mark.parametrize("config, denoiser", [("flux_bench", "flux"),
                                               ("tiny_flow_train", "mmdit")])
def test_flow_transformer_forward_matches_diffusers(capsys, tmp_path, config, denoiser):
    """bench transformer: Flux.1's forward (packed, with its ids and dev's guidance) and
    SD3's MMDiT against diffusers' models on the same weights, as their pipelines call them;
    bench train: their flow-matching AdamW step against torch's."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "transformer", "--config", config, "--batch", "1", "--repeats",
                     "1", "--compare", "torch", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    _check_common(result, batch=1)
    _check_torch(result)
    assert result["denoiser"] == denoiser
    print(f"{denoiser}: relative difference {result['relative_difference']:.2e}")
    assert 0 < result["relative_difference"] < 1e-4
    # bench train on the same config: the flow-matching step, as torch's AdamW takes it
    assert cli.main(["bench", "train", "--config", config, "--batch", "1", "--repeats", "2",
                     "--compare", "torch", "--json", str(out)]) == 0
    train = json.loads(out.read_text())
    assert train["denoiser"] == denoiser and train["trained_params"] > 0
    assert abs(train["last_loss"] - train["first_loss"]) > 1e-4  # a real step
    print(f"{denoiser} train: loss difference {train['loss_difference']:.2e}")
    assert train["loss_difference"] < 1e-4 * max(1.0, train["torch_first_loss"])


def test_train_step_with_the_context_encoded_by_the_frozen_text_tower(capsys, tmp_path):
    result = _bench(capsys, tmp_path, "train", "--batch", "2", "--context", "encoded")
    _check_common(result, batch=2)
    assert result["context"] == "encoded"
    assert abs(result["last_loss"] - result["first_loss"]) > 1e-3


def test_sample_benchmark(capsys, tmp_path):
    result = _bench(capsys, tmp_path, "sample", "--steps", "2")
    assert result["benchmark"] == "sample" and result["compilations"] == 1
    assert result["seconds_per_image"] > 0 and result["peak_rss_bytes"] > 0


def test_compile_benchmark_hits_the_cache_in_a_second_process(capsys, tmp_path):
    result = _bench(capsys, tmp_path, "compile", "--steps", "2")
    # The first process traces and exports the sampling program; the second reads it.
    assert (result["first_process_traces"], result["first_process_programs_loaded"]) == (1, 0)
    assert (result["second_process_traces"], result["second_process_programs_loaded"]) == (0, 1)
    assert result["second_process_trace_s"] < result["first_process_trace_s"]
    for process in ("first", "second"):
        assert result[f"{process}_process_warm_call_s"] > 0
    assert result["first_process_cache_misses"] >= 1 and result["first_process_cache_hits"] == 0
    assert result["second_process_cache_hits"] >= 1 and result["second_process_cache_misses"] == 0
    assert result["cache_entries"] >= 1 and result["exported_programs"] == 1
    print(f"compile: first {result['first_process_compile_s']:.2f} s, "
          f"second {result['second_process_compile_s']:.2f} s")
    assert 0 < result["second_over_first_compile"] < 1


def _flops(fn, *args) -> float:
    return measure.xla_flops(jax.jit(fn).lower(*args).compile())


def test_xla_flop_counts_match_analytic_counts():
    a, b = jnp.ones((64, 96)), jnp.ones((96, 40))
    assert _flops(jnp.matmul, a, b) == 2 * 64 * 96 * 40

    n, h, w, cin, cout, k = 2, 16, 12, 8, 32, 3
    x, kernel = jnp.ones((n, h, w, cin)), jnp.ones((k, k, cin, cout))

    def conv(padding):
        return lambda x, kernel: jax.lax.conv_general_dilated(
            x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    valid = _flops(conv("VALID"), x, kernel)
    assert valid == 2 * n * (h - k + 1) * (w - k + 1) * cout * k * k * cin
    # With padding XLA counts only the taps that land inside the image: per axis, an output
    # row sees 3 taps except the two border rows (2 each), 3h - 2 in all.
    same = _flops(conv("SAME"), x, kernel)
    assert same == 2 * n * cout * cin * (k * h - 2) * (k * w - 2)
    assert same < 2 * n * h * w * cout * k * k * cin


def test_the_cli_knows_every_benchmark_and_defaults_to_the_bench_config():
    assert all(set(v) <= set(bench.BENCHMARKS) for v in cli.BENCH_ONLY_OPTIONS.values())
    for what in bench.BENCHMARKS:  # one list, which the CLI parses from
        args = cli.build_parser().parse_args(["bench", what])
        assert args.config == "bench"  # the bundled configs/bench.py, after any install
    assert config_files.resolve("bench")[0].samefile(os.path.join(REPO_ROOT, "configs", "bench.py"))


def test_config_without_the_models_is_an_error(capsys, tmp_path):
    config = tmp_path / "other.py"
    config.write_text("import ml_collections\n\ndef get_config():\n"
                      "    return ml_collections.ConfigDict({'vae': {}})\n")
    assert cli.main(["bench", "train", "--config", str(config)]) == 1
    assert "bench train needs the config sections ['unet']" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["unet", "--config", "no/such/config.py"], "config no/such/config.py: no such file, and not a bundled config name"),
    (["unet", "--config", TINY, "--remat", "nothing_saveable"],
     "--remat applies to bench train only"),
    (["vae", "--config", TINY, "--context", "encoded"], "--context applies to bench train only"),
    (["unet", "--config", TINY, "--lora", "4"], "--lora applies to bench train only"),
    (["transformer", "--config", TINY], "this config's denoiser is a unet: use bench unet"),
    (["train", "--config", "flux_bench", "--lora", "4"], "--lora: bench train of a flow"),
    (["train", "--config", TINY, "--lora", "0"], "the LoRA rank must be at least 1"),
    (["train", "--config", TINY, "--context", "encoded", "--compare", "torch"],
     "--compare torch times the U-Net step on a precomputed context"),
    (["compile", "--config", TINY, "--compare", "torch"], "--compare applies to bench unet"),
    (["train", "--config", TINY, "--remat", "everything"], "valid policies are"),
    (["vae", "--config", TINY, "--batch", "0"], "--batch must be at least 1"),
    (["vae", "--config", TINY, "--blocks", "2"], "--blocks alternates ours and PyTorch's runs: add --compare torch"),
    (["compile", "--config", TINY, "--blocks", "2"], "--blocks applies to bench unet"),
    (["vae", "--config", TINY, "--json", "no/such/dir/out.json"], "does not exist"),
    (["unet", "--config", TINY, "--devices", "2"], "--devices applies to bench memory only"),
    (["memory", "--config", "tiny_train", "--batch", "2"], "--batch applies to bench unet"),
    (["unet", "--config", TINY, "--config.unet.sample_size=4"],
     "overrides apply to `train`, `precompute` and `bench memory` only"),
])
def test_bad_input_is_one_line_on_stderr(capsys, argv, needle):
    assert cli.main(["bench", *argv]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("diffusion-jax: error: ") and needle in err


def test_unknown_benchmark_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "clip"])
    assert info.value.code == 2
    assert "invalid choice: 'clip'" in capsys.readouterr().err


def test_unet_and_train_benchmarks_of_an_sdxl_shaped_unet_feed_the_micro_conditioning():
    """configs/sdxl_bench.py's structure (text_time, several transformer blocks per layer),
    shrunk: both sides get the pooled embedding and the size/crop numbers, and agree."""
    config = config_files.as_dict(config_files.load("sdxl_bench"))
    config["unet"].update(sample_size=8, block_out_channels=(32, 64, 64),
                          attention_head_dim=(1, 1, 1), transformer_layers_per_block=(1, 2, 1),
                          norm_num_groups=8)
    result = bench.run("unet", config, batch=1, repeats=1, compare_torch=True)
    assert result["max_abs_difference"] < 1e-4
    assert result["latent_shape"] == [1, 8, 8, 4]
    train = bench.run("train", config, batch=1, repeats=2, compare_torch=True)
    assert train["loss_difference"] < 1e-4 and train["last_loss"] < train["first_loss"]
    # Encoded in the step: the pooled embedding comes from the second tower's projection.
    encoded = bench.run("train", config, batch=1, repeats=1, context="encoded")
    assert encoded["context"] == "encoded" and encoded["first_loss"] > 0


def test_memory_compiles_a_training_config_for_fake_devices_and_reports_per_device_bytes(tmp_path):
    """`bench memory` on configs/tiny_train.py for 2 fake devices, its params sharded over
    both: XLA's figures of the trainer's own step, no weights or data read."""
    import subprocess
    import sys

    out = tmp_path / "memory.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.cli", "bench", "memory", "--config", "tiny_train",
         "--devices", "2", "--config.mesh.data=1", "--config.mesh.fsdp=2",
         "--config.mesh.fsdp_min_size=64", "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["devices"] == 2 and figures["mesh"] == {"data": 1, "fsdp": 2}
    assert figures["global_batch"] == 8 and figures["per_device_batch"] == 4
    assert figures["xla_total_bytes"] == (figures["xla_argument_bytes"] + figures["xla_output_bytes"]
                                          + figures["xla_temp_bytes"] - figures["xla_alias_bytes"]) > 0
    # The train state (float32 params, two AdamW moments, EMA) is sharded: each device holds
    # about half of its 16 bytes per trained param.
    assert figures["state_per_device_bytes"] < 0.75 * 16 * figures["trained_params"]
    for key in ("argument_bytes_per_device", "temp_bytes_per_device", "total_bytes_per_device"):
        assert key in result.stdout and figures[key].endswith(("KiB", "MiB", "GiB"))


def test_blocks_summarize_to_the_median_ratio_and_its_spread():
    from diffusion_jax.bench import blocks

    runs = [dict(benchmark="vae", median_s=m, torch_median_s=t, ratio_vs_torch=t / m)
            for m, t in ((1.0, 1.2), (1.1, 0.99), (0.9, 1.35))]
    summary = blocks.summarize(runs)
    assert summary["blocks"] == 3 and summary["ratio_vs_torch"] == pytest.approx(1.2)
    assert summary["ratio_vs_torch_min"] == pytest.approx(0.9)
    assert summary["ratio_vs_torch_max"] == pytest.approx(1.5)
    assert summary["median_s"] == 1.0 and summary["torch_median_s"] == 1.2
    assert summary["median_s_blocks"] == [1.0, 1.1, 0.9]


def test_blocks_run_each_side_in_fresh_processes(capsys, tmp_path):
    result = _bench(capsys, tmp_path, "vae", "--compare", "torch", "--blocks", "2", "--batch", "1")
    assert TORCH_KEYS <= set(result) and result["blocks"] == 2 and len(result["ratio_vs_torch_blocks"]) == 2
    assert result["ratio_vs_torch_min"] <= result["ratio_vs_torch"] <= result["ratio_vs_torch_max"]
    assert result["program_kind"] == "vae" and "cpu_isa" in result
