"""The one checkpoint format: an Orbax `CheckpointManager` directory.

    DIR/
      0/                 one step directory per saved step (converted weights are step 0)
        unet/            one Orbax pytree item per model's params ...
        vae/
        text_encoder/
        unet_ema/        ... EMA copies are items of their own
        config/          JSON: model configs, schedule, tokenizer, format_version
      1000/ ...

The `config` item holds a section per model of the system (`unet`, `vae`, `text_encoder` for
SD 1.x/2.x: diffusers / transformers config.json key names, as `configs/*.py` write them),
`schedule` (diffusers scheduler config names), a section per tokenizer (`pad_token`,
`max_length`), `format_version`, and `system` (the description `system.py` reads) unless the
system is SD 1.x/2.x's, which every checkpoint before the section existed describes. Other pytree items (optimizer
state, ...) can sit beside the params in a step: `save` writes any pytree item, `load` reads
the model items unless asked for others.

A training step may keep the towers no stage trains (a LoRA run's base, a fine-tune's VAE) in
a sibling checkpoint, written once: its config's `frozen_towers` names them and the folder
beside DIR that holds them (`WORKDIR/frozen` beside `WORKDIR/checkpoints`); `item_names` and
`load` read them from there as if the step held them.

`sample`, `export` and `fid` read DIR through `load_models`, which also takes a training
workdir (its `checkpoints/`) or one step folder `DIR/1000` (`resolve`), and reads only the
model items, preferring their EMA copies.

DIR may be local or a gs:// URI (TPU pods): paths are `etils.epath` paths, whose files go
through gcsfs and whose arrays Orbax writes with TensorStore's GCS driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import system as system_lib

FORMAT_VERSION = 1
CONFIG_ITEM = "config"
EMA_SUFFIX = "_ema"
WORKDIR_CHECKPOINTS = "checkpoints"  # the checkpoint directory inside a training workdir
FROZEN_KEY = "frozen_towers"  # a step config's {"folder": sibling of DIR, "items": [...]}


class CheckpointError(ValueError):
    """A directory that is not a (readable) diffusion_jax checkpoint, or a missing step/item."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (gs://bucket/...) rather than a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path, which keeps a URI a URI (pathlib turns gs://b/run into the
    local gs:/b/run); a clear error when the filesystem package for the URI is missing."""
    path = epath.Path(path)
    if is_remote(path):
        import fsspec

        try:  # epath reaches gs:// through fsspec, which needs gcsfs
            fsspec.get_filesystem_class(os.fspath(path).split("://")[0])
        except ImportError as e:
            raise ValueError(f"{path}: {e}; pip install 'diffusion-jax[gcs]'") from None
    return path


def _orbax_path(path: epath.Path) -> epath.Path:
    """Orbax wants absolute local paths; `absolute()` would mangle a URI."""
    return path if is_remote(path) else path.absolute()


def _not_a_checkpoint(directory: epath.Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{directory} is not a diffusion_jax checkpoint: {why}; create one with "
        "`diffusion-jax convert --from diffusers|single-file SRC --out DIR` or by training")


def is_model_item(name: str, config: Mapping[str, Any]) -> bool:
    """Whether an item holds one of the system's models' params (`unet`, ..., or an `_ema`)."""
    base = name[:-len(EMA_SUFFIX)] if name.endswith(EMA_SUFFIX) else name
    return base in system_lib.from_config(config).names


def _manager(directory: epath.Path, item_names: Iterable[str]) -> ocp.CheckpointManager:
    handlers = {name: ocp.StandardCheckpointHandler() for name in item_names}
    handlers[CONFIG_ITEM] = ocp.JsonCheckpointHandler()
    return ocp.CheckpointManager(_orbax_path(directory), item_handlers=handlers)


def _to_json(value: Any) -> Any:
    """Config values as JSON types (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def validate_config(config: Mapping[str, Any]) -> None:
    """The config item must describe every model the checkpoint can hold."""
    try:
        sections = system_lib.from_config(config).config_sections
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint config: its `system` section is not readable ({e})"
                              ) from None
    missing = [s for s in sections if s not in config]
    if missing:
        raise CheckpointError(f"checkpoint config lacks section(s) {missing}; "
                              f"it needs {list(sections)}")


def save(directory: str | os.PathLike, step: int, items: Mapping[str, Any],
         config: Mapping[str, Any]) -> None:
    """Writes `items` (name -> pytree of arrays, e.g. {"unet": params, "unet_ema": ...}) and the
    config as step `step` of the checkpoint at `directory` (created if needed). Orbax writes
    each step to a temporary directory and renames it, so a step is never half-written."""
    directory = as_path(directory)
    if CONFIG_ITEM in items:
        raise ValueError(f"`{CONFIG_ITEM}` is the config item's name, not a params item's")
    validate_config(config)
    config = {**_to_json(config), "format_version": FORMAT_VERSION}
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    with _manager(directory, items) as manager:
        manager.save(step, args=ocp.args.Composite(**args, **{CONFIG_ITEM: ocp.args.JsonSave(config)}))
        manager.wait_until_finished()


def steps(directory: str | os.PathLike) -> list[int]:
    """The saved steps, ascending; a CheckpointError when the directory is not a checkpoint.
    Read from the folder names (Orbax renames a step into place when it is complete), not
    through a CheckpointManager: on several hosts a manager syncs them, and a host that
    looks at a checkpoint alone (the preflight, a process-0 read) would wait forever."""
    directory = as_path(directory)
    if not directory.is_dir():
        why = "it is a file, not a directory" if directory.exists() else "no such directory"
        raise _not_a_checkpoint(directory, why)
    found = sorted(int(p.name) for p in directory.iterdir()
                   if p.name.isdigit() and p.is_dir() and _finalized(p))
    if not found:
        raise _not_a_checkpoint(directory, "it holds no checkpoint step directories")
    return found


def _finalized(step_dir: epath.Path) -> bool:
    """Orbax's own test: a renamed step folder locally, commit_success.txt on GCS (no renames)."""
    from orbax.checkpoint.path import step as ocp_step

    return ocp_step.is_path_finalized(_orbax_path(step_dir))


def _resolve_step(directory: epath.Path, step: int | None) -> int:
    available = steps(directory)
    if step is None:
        return available[-1]
    if step not in available:
        raise CheckpointError(f"checkpoint {directory} has no step {step}; steps: {available}")
    return step


def _is_step_folder(path: epath.Path) -> bool:
    """`DIR/12`: one step of a checkpoint (a checkpoint DIR itself has no config item)."""
    return path.name.isdigit() and (path / CONFIG_ITEM).is_dir()


def _holds_steps(path: epath.Path) -> bool:
    return path.is_dir() and any(p.name.isdigit() and p.is_dir() for p in path.iterdir())


def resolve(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoint directory, step) that `path` names: a checkpoint directory (`step`, default
    the latest), a training workdir holding `checkpoints/`, or one step folder `DIR/12` (that
    step). `sample`, `export`, `fid` and `pipeline.load` all resolve their checkpoint here."""
    path = as_path(path)
    if _is_step_folder(path):
        folder_step = int(path.name)
        if step is not None and step != folder_step:
            raise CheckpointError(f"{path} is step {folder_step} of checkpoint {path.parent}, "
                                  f"but step {step} was asked for; pass {path.parent} to "
                                  "choose another step")
        return path.parent, folder_step
    if not _holds_steps(path) and (path / WORKDIR_CHECKPOINTS).is_dir():
        path = path / WORKDIR_CHECKPOINTS
    return path, _resolve_step(path, step)


def _saved_items(directory: epath.Path, step: int) -> list[str]:
    step_dir = directory / str(step)
    return sorted(p.name for p in step_dir.iterdir() if p.is_dir() and p.name != CONFIG_ITEM)


def frozen_source(directory: str | os.PathLike, config: Mapping[str, Any]
                  ) -> tuple[epath.Path, list[str]] | None:
    """(the checkpoint holding the towers a step keeps elsewhere, their names), or None."""
    ref = config.get(FROZEN_KEY)
    if not ref:
        return None
    return as_path(directory).parent / ref["folder"], list(ref["items"])


def item_names(directory: str | os.PathLike, step: int | None = None) -> list[str]:
    """Names of the pytree items of `step` (default: the latest), config excluded: those
    saved in it and the frozen towers it keeps in a sibling checkpoint."""
    directory = as_path(directory)
    step = _resolve_step(directory, step)
    saved = _saved_items(directory, step)
    frozen = frozen_source(directory, read_config(directory, step)) if (
        directory / str(step) / CONFIG_ITEM).is_dir() else None
    return sorted({*saved, *(frozen[1] if frozen else ())})


def read_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The config item of `step` (default: the latest)."""
    directory = as_path(directory)
    step = _resolve_step(directory, step)
    if not (directory / str(step) / CONFIG_ITEM).is_dir():
        raise _not_a_checkpoint(directory, f"step {step} has no `{CONFIG_ITEM}` item")
    with contextlib.closing(ocp.JsonCheckpointHandler()) as handler:  # no manager: see steps()
        config = handler.restore(_orbax_path(directory) / str(step) / CONFIG_ITEM)
    version = config.get("format_version") if isinstance(config, dict) else None
    if version is None:
        raise _not_a_checkpoint(directory, f"the `{CONFIG_ITEM}` item of step {step} has no "
                                           "format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory} has format_version {version}; this "
                              f"diffusion_jax reads up to {FORMAT_VERSION}: upgrade it")
    validate_config(config)
    return config


def load(directory: str | os.PathLike, step: int | None = None,
         items: Iterable[str] | None = None) -> tuple[dict[str, Any], dict]:
    """(items, config) of `step` (default: the latest). `items` defaults to every model-params
    item saved (`unet`, `vae`, `text_encoder`, EMA copies); arrays come back as host numpy
    arrays, shaped by what was saved (no template needed)."""
    directory = as_path(directory)
    step = _resolve_step(directory, step)
    config = read_config(directory, step)
    saved = _saved_items(directory, step)
    frozen_dir, frozen = frozen_source(directory, config) or (None, [])
    wanted = [n for n in (*saved, *frozen) if is_model_item(n, config)
              ] if items is None else list(items)
    absent = [n for n in wanted if n not in saved and n not in frozen]
    if absent:
        raise CheckpointError(f"checkpoint {directory} step {step} has no item(s) {absent}; "
                              f"it holds {sorted({*saved, *frozen})}")
    elsewhere = [n for n in wanted if n not in saved]
    shared = _load_frozen(directory, step, frozen_dir, elsewhere) if elsewhere else {}
    wanted = [n for n in wanted if n in saved]
    if not wanted:
        return shared, config
    # Each wanted item's metadata from its own folder: the manager's `item_metadata` opens
    # every saved item and warns about each it has no handler for (`trainer`, optimizer).
    step_dir = _orbax_path(directory) / str(step)
    with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
        # A numpy template restores onto the host; np.empty reserves no pages until written.
        templates = {name: _numpy_template(handler.metadata(step_dir / name).tree)
                     for name in wanted}
    with _manager(directory, wanted) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(t) for name, t in templates.items()}))
    return {**shared, **{name: restored[name] for name in wanted}}, config


def frozen_checkpoint(directory: epath.Path, step: int, frozen_dir: epath.Path) -> epath.Path:
    """The sibling checkpoint a step's frozen towers are in; a clear error when it is gone
    (a step folder copied without it)."""
    try:
        steps(frozen_dir)
    except CheckpointError:
        raise CheckpointError(
            f"checkpoint {directory} step {step} keeps its frozen towers in {frozen_dir}, "
            f"which is missing or incomplete: copy the run's `{frozen_dir.name}/` folder "
            f"beside `{directory.name}/` too") from None
    return frozen_dir


def _load_frozen(directory: epath.Path, step: int, frozen_dir: epath.Path,
                 names: list[str]) -> dict[str, Any]:
    return load(frozen_checkpoint(directory, step, frozen_dir), items=names)[0]


def restore(directory: str | os.PathLike, templates: Mapping[str, Any],
            step: int | None = None) -> dict[str, Any]:
    """Pytree items of `step` (default: the latest) shaped and sharded like `templates`
    (jax.ShapeDtypeStructs with shardings), onto the devices: a resumed run's frozen towers."""
    directory = as_path(directory)
    step = _resolve_step(directory, step)
    with _manager(directory, templates) as manager:
        return dict(manager.restore(step, args=ocp.args.Composite(
            **{n: ocp.args.StandardRestore(t) for n, t in templates.items()})))


@dataclasses.dataclass(frozen=True)
class Source:
    """Which weights `load_models` read: what a generated image's metadata records."""

    directory: str  # the checkpoint directory, resolved (not a workdir or a step folder)
    step: int
    ema: bool  # EMA params were used


# Model config fields a run may change without changing the model: the latent scaling (the
# VAE stage measures it) and the native size (a default for sampling).
NOT_ARCHITECTURE = ("scaling_factor", "shift_factor", "sample_size")


def architecture_differences(saved: Mapping[str, Any], ours: Mapping[str, Any],
                             names: Iterable[str] | None = None) -> list[str]:
    """'unet.block_out_channels was (..), now (..)' for each field of the `names` models
    (default: all of `ours`' system) in which two config dicts (checkpoint configs or config
    sections) describe different models; 'system ...' when they are different systems (a
    base model taken into a system that adds adapters to it is the same, for `names` of the
    base: a ControlNet run starts from its base's checkpoint)."""
    saved_system, our_system = system_lib.from_config(saved), system_lib.from_config(ours)
    base = lambda s: dataclasses.replace(s, adapters=())
    same_base = names is not None and base(saved_system) == base(our_system) and all(
        name in saved_system.names for name in names)
    if saved_system != our_system and not same_base:
        return [f"system was {saved_system.to_dict()}, now {our_system.to_dict()}"]
    rows = []
    for name in our_system.names if names is None else names:
        tower = our_system.tower(name)
        a, b = system_lib.tower_config(tower, saved), system_lib.tower_config(tower, ours)
        rows += [f"{name}.{f} was {getattr(a, f)!r}, now {getattr(b, f)!r}"
                 for f in a.__dataclass_fields__
                 if f not in NOT_ARCHITECTURE and getattr(a, f) != getattr(b, f)]
    return rows


def fill_t5_vocabularies(sections: dict, init_from: str | None) -> None:
    """No T5 vocabulary ships with diffusion_jax: a T5 tower's tokenizer section without one
    takes init_from's (a converted checkpoint keeps its folder's tokenizer.json), at the
    section's max_length. What training and precompute tokenize with."""
    if not init_from:
        return
    for tower in system_lib.from_config(sections).text_towers:
        section = sections[tower.tokenizer]
        if tower.kind != "t5" or "tokenizer_json" in section:
            continue
        try:
            saved = read_config(init_from).get(tower.tokenizer, {})
        except CheckpointError:
            continue  # the preflight says what is wrong with it
        if "tokenizer_json" in saved:
            sections[tower.tokenizer] = {**saved, "max_length": section.get(
                "max_length", saved.get("max_length"))}


def initial_params(sections: Mapping[str, Any], *, seed: int, init_from: str = "",
                   from_checkpoint: Iterable[str] | None = None,
                   names: Iterable[str] | None = None) -> dict:
    """The params of the `names` models (default: the whole system) a run starts from: those
    in `from_checkpoint` (default: all) read from the `init_from` checkpoint (callers check
    its architecture first), the others initialised from `seed` (`system.init_params`: a
    fresh ControlNet from the U-Net, loaded or not)."""
    system = system_lib.from_config(sections)
    names = system.names if names is None else tuple(names)
    from_checkpoint = names if from_checkpoint is None else tuple(from_checkpoint)
    loaded = [n for n in names if n in from_checkpoint] if init_from else []
    params = load(init_from, items=loaded)[0] if loaded else {}
    fresh = [n for n in names if n not in params]
    denoiser = None if system.denoiser is None else params.get(system.denoiser.name)
    return {**params, **system_lib.init_params(system, sections, seed, fresh,
                                               denoiser_params=denoiser)}


def load_models(path: str | os.PathLike, step: int | None = None, *, use_ema: bool = True
                ) -> tuple[dict[str, Any], dict, Source]:
    """(params by model name, config, source) for `sample`, `export` and `fid`: `path` as
    `resolve` takes it, and each model's EMA copy where the checkpoint has one and `use_ema`
    (the default everywhere), else its raw params. Reads only those items."""
    directory, step = resolve(path, step)
    saved = item_names(directory, step)
    names = system_lib.from_config(read_config(directory, step)).names
    chosen = {name: name + EMA_SUFFIX if use_ema and name + EMA_SUFFIX in saved else name
              for name in names}
    missing = [item for item in chosen.values() if item not in saved]
    if missing:
        raise CheckpointError(f"checkpoint {directory} step {step} lacks {missing} (it holds "
                              f"{saved}): every model of the system ({', '.join(names)}) is "
                              "needed")
    lora = "lora"  # a LoRA run's factors (adapters/lora_train.py), merged into its towers
    if lora in saved:
        chosen[lora] = lora + EMA_SUFFIX if use_ema and lora + EMA_SUFFIX in saved else lora
    items, config = load(directory, step, items=chosen.values())
    source = Source(str(directory), step, ema=any(item != name for name, item in chosen.items()))
    params = {name: items[item] for name, item in chosen.items()}
    if lora in params:
        import jax

        from diffusion_jax.adapters import lora_train

        params = jax.device_get(lora_train.adapted(params, config))  # host arrays, as loaded
    return params, config, source


def display_name(directory: str | os.PathLike) -> str:
    """A checkpoint's short name: its folder's, or the workdir's for a training run's."""
    path = as_path(directory)
    return path.parent.name if path.name == WORKDIR_CHECKPOINTS else path.name


def _numpy_template(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _numpy_template(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):  # optimizer states: optax's tuples come back as lists
        return [_numpy_template(v) for v in tree]
    if tree is None:
        return None
    return np.empty(tree.shape, tree.dtype)


def check_new_directory(path: str | os.PathLike) -> None:
    """Raises unless `path` can become a new output directory: absent or empty, parent present.
    Local only: a GCS "directory" cannot be renamed into place, so it could appear half-written."""
    if is_remote(path):
        raise ValueError(f"output {os.fspath(path)}: new directories are written locally only; "
                         "write it to a local path, then copy it (gcloud storage cp -r)")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output {path} already exists and is not empty; choose a new "
                              "path or remove it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output {path}: parent directory {path.parent} does not exist")


@contextlib.contextmanager
def new_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to fill; renames it to `path` when the block ends
    without an exception, else deletes it. Refuses a `path` that exists and is not empty, so
    an output is either complete or absent."""
    check_new_directory(path)
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            path.rmdir()  # an empty directory: replaced
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def create(directory: str | os.PathLike, items: Mapping[str, Any],
           config: Mapping[str, Any]) -> None:
    """A new checkpoint directory holding `items` and `config` as step 0 (converted weights).
    `directory` must not exist or be empty; it appears complete or not at all."""
    with new_directory(directory) as tmp:
        save(tmp, 0, items, config)


class TrainingCheckpointer:
    """The trainer's view of a checkpoint directory: one long-lived Orbax manager that saves
    asynchronously, keeps the last `keep` steps plus the `keep_best` best by `best_metric`
    (lowest, or highest with `higher_is_better`) among the steps saved with that metric,
    and restores typed pytrees (optimizer state) from templates.

    A step holds the model items (`unet`, `unet_ema`, `vae`, `text_encoder`, ...), pytree
    items the trainer needs (optimizer state), JSON items (`trainer`: stage, data iterator
    state) and the `config` item, so `pipeline.load`, `export` and `fid` read it as any
    other checkpoint."""

    def __init__(self, directory: str | os.PathLike, *, pytree_items: Iterable[str],
                 json_items: Iterable[str], keep: int = 2, keep_best: int = 1,
                 best_metric: str = "eval_loss", higher_is_better: bool = False):
        self.directory = _orbax_path(as_path(directory))
        self.pytree_items, self.json_items = tuple(pytree_items), tuple(json_items)
        handlers = {name: ocp.StandardCheckpointHandler() for name in self.pytree_items}
        handlers.update({name: ocp.JsonCheckpointHandler()
                         for name in (*self.json_items, CONFIG_ITEM)})
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if keep_best:
            worst = -math.inf if higher_is_better else math.inf  # a step saved without it
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: float(metrics.get(best_metric, worst)),
                reverse=not higher_is_better, n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True)  # a write killed half-way leaves only a tmp dir
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                             options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, pytrees: Mapping[str, Any], json_items: Mapping[str, Any],
             config: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """Starts writing `step`; returns once arrays are copied off the devices."""
        validate_config(config)
        config = {**_to_json(config), "format_version": FORMAT_VERSION}
        args = {name: ocp.args.StandardSave(tree) for name, tree in pytrees.items()}
        args.update({name: ocp.args.JsonSave(_to_json(v)) for name, v in json_items.items()})
        args[CONFIG_ITEM] = ocp.args.JsonSave(config)
        self.manager.save(step, args=ocp.args.Composite(**args), metrics=dict(metrics) if metrics else None,
                          force=True)

    def restore(self, step: int, templates: Mapping[str, Any], json_items: Iterable[str]
                ) -> dict[str, Any]:
        """Items of `step`: pytrees shaped (and sharded) like `templates` (arrays or
        jax.ShapeDtypeStruct), plus the named JSON items and the config."""
        args = {name: ocp.args.StandardRestore(t) for name, t in templates.items()}
        args.update({name: ocp.args.JsonRestore() for name in (*json_items, CONFIG_ITEM)})
        return dict(self.manager.restore(step, args=ocp.args.Composite(**args)))

    def reached_preemption(self, step: int) -> bool:
        """Whether the cluster announced a preemption (multi-host: agreed across hosts)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
