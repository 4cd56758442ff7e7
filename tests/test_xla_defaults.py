"""`import diffusion_jax` sets the XLA CPU defaults BENCHMARKS.md measured (YNNPACK off),
never overriding a user's own flag, and never a flag this jaxlib would reject."""

import os
import subprocess
import sys

from diffusion_jax import xla_defaults

FLAG = xla_defaults.YNNPACK_FLAG


def _child(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("XLA_FLAGS", xla_defaults.OPT_OUT)}
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
