"""`import diffusion_jax` sets the XLA CPU defaults BENCHMARKS.md measured (YNNPACK off),
never overriding a user's own flag, and never a flag this jaxlib would reject."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_jax import xla_defaults

FLAG = xla_defaults.YNNPACK_FLAG


def _child(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("XLA_FLAGS", xla_defaults.OPT_OUT, xla_defaults.ADDED)}
    done = subprocess.run([sys.executable, "-c", code], env={**environ, **env},
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_flags_to_add_respects_the_user_and_the_jaxlib():
    known = xla_defaults.KNOWN_JAXLIB[0]
    assert xla_defaults.flags_to_add("", {}, known) == [f"{FLAG}="]
    assert xla_defaults.flags_to_add("--xla_dump_to=/tmp/x", {}, known) == [f"{FLAG}="]
    assert xla_defaults.flags_to_add(f"{FLAG}=individual_dot", {}, known) == []
    assert xla_defaults.flags_to_add("", {xla_defaults.OPT_OUT: "0"}, known) == []
    assert xla_defaults.flags_to_add("", {}, (0, 4)) == []  # an older XLA would abort on it


def test_import_sets_the_flag_and_jax_still_starts():
    # Another flag is kept and still parsed (2 host devices), ours is appended.
    code = ("import os, diffusion_jax, jax; "
            "print(os.environ['XLA_FLAGS'], '|', jax.device_count())")
    flags, count = _child(code, XLA_FLAGS="--xla_force_host_platform_device_count=2").split("|")
    assert flags.split() == ["--xla_force_host_platform_device_count=2", f"{FLAG}="]
    assert int(count) == 2


def test_user_choice_opt_out_and_a_started_backend_are_left_alone():
    show = "import os, diffusion_jax; print(os.environ.get('XLA_FLAGS', '<unset>'))"
    assert _child(show, XLA_FLAGS=f"{FLAG}=individual_dot") == f"{FLAG}=individual_dot"
    assert _child(show, **{xla_defaults.OPT_OUT: "0"}) == "<unset>"
    started = "import jax; jax.numpy.ones(1).block_until_ready(); " + show
    assert _child(started) == "<unset>"


# ------------------------------------------------------------------ options per program

AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
ON = {xla_defaults.YNNPACK_OPTION: xla_defaults.YNNPACK_ON}
OFF = {xla_defaults.YNNPACK_OPTION: xla_defaults.YNNPACK_OFF}
DOTS_AND_REDUCES = {xla_defaults.YNNPACK_OPTION: xla_defaults.YNNPACK_DOTS_AND_REDUCES}


def test_cpu_isa_reads_the_widest_vector_set():
    assert xla_defaults.cpu_isa(AVX2_CPUINFO) == "avx2"
    assert xla_defaults.cpu_isa(AVX512_CPUINFO) == "avx512"
    assert xla_defaults.cpu_isa("processor\t: 0\nFeatures\t: fp asimd\n") == "other"  # Arm


def test_each_program_kind_gets_what_was_measured_for_it():
    options = lambda kind, isa, **kw: xla_defaults.compiler_options(
        kind, backend="cpu", isa=isa, environ={}, user_xla_flags="", **kw)
    # The AVX-512 Xeon's measurements: dots and reductions beat all-on and off for these two
    assert options("train_step", "avx512") == DOTS_AND_REDUCES  # 2.39 s vs 2.66 on, 3.27 off
    assert options("forward", "avx512") == DOTS_AND_REDUCES  # 0.57 s vs 0.63 on, 0.92 off
    assert options("vae", "avx512") == OFF  # 0.30 s vs 0.38 dots and reductions, 0.44 on
    assert [options(kind, "avx2") for kind in xla_defaults.PROGRAM_KINDS] == [OFF] * 4
    assert options("train_step", "other") == OFF


def test_the_user_and_other_backends_get_no_options():
    kw = dict(isa="avx512", environ={})
    assert xla_defaults.compiler_options("train_step", backend="gpu", user_xla_flags="", **kw) == {}
    assert xla_defaults.compiler_options("train_step", backend="cpu",
                                         user_xla_flags=f"{FLAG}=", **kw) == {}
    assert xla_defaults.compiler_options("vae", backend="cpu", user_xla_flags="", isa="avx512",
                                         environ={xla_defaults.OPT_OUT: "0"}) == {}
    with pytest.raises(ValueError, match="unknown program kind 'unet'.*train_step"):
        xla_defaults.compiler_options("unet", backend="cpu")


_PROGRAMS = '''
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
programs = [lambda x, w, b: jnp.tanh(conv(x, w).reshape(-1, 64) @ b).sum(),
            lambda x, w, b: jax.grad(lambda w: (jax.nn.silu(conv(x, w)) ** 2).mean())(w),
            lambda x, w, b: jax.nn.softmax(x.reshape(-1, 64) @ b, axis=-1),
            lambda x, w, b: conv(x, w)]
args = jnp.ones((2, 8, 8, 64)), jnp.ones((3, 3, 64, 64)), jnp.ones((64, 64))
text = lambda f, options: jax.jit(f).lower(*args).compile(compiler_options=options).as_text()
'''


def test_ynnpack_on_compiles_as_the_jaxlib_default():
    # In a process without our flag: the spelled-out default gives the default's programs.
    code = ("from diffusion_jax import xla_defaults as d\n" + _PROGRAMS
            + "print(all(text(f, {}) == text(f, {d.YNNPACK_OPTION: d.YNNPACK_ON}) for f in programs))")
    assert _child(code, **{xla_defaults.OPT_OUT: "0"}) == "True"


def test_a_programs_options_reach_its_executable():
    # With YNNPACK off for the process (import diffusion_jax), a program compiled with the
    # ON option has YNNPACK fusions, and one compiled with OFF has none.
    code = ("from diffusion_jax import xla_defaults as d\n" + _PROGRAMS
            + "print([('__ynn_fusion' in text(programs[0], o)) for o in "
              "({}, {d.YNNPACK_OPTION: d.YNNPACK_ON}, {d.YNNPACK_OPTION: d.YNNPACK_OFF})])")
    assert _child(code) == "[False, True, False]"
    # Dots and reductions only: the matmul-softmax program fuses into YNNPACK, a lone conv not.
    code = ("from diffusion_jax import xla_defaults as d\n" + _PROGRAMS
            + "o = {d.YNNPACK_OPTION: d.YNNPACK_DOTS_AND_REDUCES}\n"
              "print([('__ynn_fusion' in text(programs[i], o)) for i in (2, 3)])")
    assert _child(code) == "[True, False]"


def test_the_trainers_step_and_cached_programs_compile_with_their_kinds_options(
        monkeypatch, tmp_path):
    import jax
    import jax.numpy as jnp
    from etils import epath

    from diffusion_jax import parallel, program_cache
    from diffusion_jax.config_files import load as load_config_file
    from diffusion_jax.training import preflight, trainer

    monkeypatch.setattr(xla_defaults, "YNNPACK_FUSIONS",
                        {xla_defaults.cpu_isa(): {"train_step": xla_defaults.YNNPACK_ON}})
    monkeypatch.setattr(xla_defaults, "_user_xla_flags", "")
    config = load_config_file(Path(__file__).resolve().parent.parent / "configs" / "tiny_train.py")
    ckpt_config = trainer.model_config(config)
    mesh = parallel.make_mesh(config.mesh)
    program = trainer.stage_program(config, ckpt_config, mesh, "diffusion",
                                    preflight.abstract_towers(ckpt_config))
    lowered = program.step_fn.lower(
        parallel.abstract(program.state_shapes, program.state_sharding),
        parallel.abstract(program.frozen, program.frozen_sharding),
        preflight.batch_shapes(config, "diffusion"))
    assert "__ynn_fusion" in lowered.compile().as_text()

    # A program read back from the exported-program cache compiles with its kind's options.
    monkeypatch.setattr(program_cache, "directory", lambda: epath.Path(tmp_path))
    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    args = (jnp.ones((64, 64)), jnp.ones((64, 64)))
    for kind, fused in (("train_step", True), ("forward", False)):
        fn, source = program_cache.load_or_export(f, args, {"test": 1}, mesh=mesh,
                                                  program_kind=kind)
        assert ("__ynn_fusion" in fn.lower(*args).compile().as_text()) == fused
    assert source == "read"  # the second came from the file the first wrote


def test_a_subprocess_does_not_take_our_flag_for_its_users():
    # A child of a process that imported diffusion_jax inherits XLA_FLAGS with our flag in
    # it (and the note that we added it): its programs still get their kinds' options. A
    # user's own flag, inherited the same way, still wins.
    show = ("import os, diffusion_jax; from diffusion_jax import xla_defaults as d; "
            "print(os.environ['XLA_FLAGS'], '|', d.compiler_options('vae'))")
    parent = _child("import os, diffusion_jax; print(os.environ['XLA_FLAGS'], '|', "
                    "os.environ[diffusion_jax.xla_defaults.ADDED])")
    flags, added = (part.strip() for part in parent.split("|"))
    child_flags, options = _child(show, XLA_FLAGS=flags, **{xla_defaults.ADDED: added}).split("|")
    assert child_flags.split() == [f"{FLAG}="]  # not appended twice
    assert options.strip() == str(OFF)
    user = _child(show, XLA_FLAGS=f"{FLAG}=")  # the same flag, set by the user
    assert user.split("|")[1].strip() == "{}"
