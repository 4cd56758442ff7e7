"""What the subcommands share: the program name, config sections, fake devices, progress."""

from __future__ import annotations

import sys
from pathlib import Path

PROG = "diffusion-jax"


def config_sections(spec: str | None) -> dict | None:
    from diffusion_jax import config_files

    return None if spec is None else config_files.as_dict(config_files.load(spec))


def fake_cpu_devices(count: int) -> None:
    """N CPU devices for an abstract compile of a pod's program on this machine; must run
    before JAX starts a backend."""
    import os

    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == "cpu" and jax.device_count() == count:
            return  # an earlier dry run in this process set them up
        raise ValueError(f"--devices {count}: a JAX backend with {jax.device_count()} "
                         "devices already started in this process")
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{flag}={count}"])
    jax.config.update("jax_platforms", "cpu")


CHECKPOINT_HELP = ("checkpoint directory; a training workdir (its checkpoints/) or one step "
                   "folder (DIR/STEP) works too")


def read_prompts(path: str) -> list[str]:
    """The prompts of a --prompts FILE: its non-empty lines, stripped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts")
    return prompts


def eta(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else \
        f"{minutes}:{seconds:02d}"


def with_progress(batches, total: int | None, label: str):
    import time

    start, done = time.perf_counter(), 0
    for batch in batches:
        done += len(batch)
        rate = done / max(time.perf_counter() - start, 1e-9)
        left = f", ETA {eta((total - done) / rate)}" if total and done < total else ""
        print(f"\r{label}: {done}{f'/{total}' if total else ''} images ({rate:.2f} images/s"
              f"{left})", end="", file=sys.stderr, flush=True)
        yield batch
    print(file=sys.stderr)


def generation_share(total: int, batch_size: int) -> tuple[str, int]:
    """The progress label and image count of this process's share of a generation job."""
    import jax

    from diffusion_jax import parallel

    count = jax.process_count()
    if count == 1:
        return "generated", total
    mine = parallel.my_batches(-(-total // batch_size))
    images = sum(min(batch_size, total - k * batch_size) for k in mine)
    return f"generated (process {jax.process_index()} of {count})", images

