"""The training loop: stage 1 trains the VAE, stage 2 the latent-diffusion U-Net.

One checkpoint directory (WORKDIR/checkpoints) numbers steps across both stages (the VAE
stage takes steps 1..N1, the U-Net stage N1+1..N1+N2); every step directory is a
diffusion_jax checkpoint (the towers a stage trains, `<tower>_ema` for each with EMA params,
the config, which names the frozen towers saved once in WORKDIR/frozen: frozen.py) plus what
resuming needs (optimizer state, the `trainer` JSON with the stage and the data iterator
state). A restarted run picks up from the newest step (starting_point.py) and sees exactly
the batches and randomness it would have seen.

A stage is a `Stage` record; what it trains, and which of those params keep an EMA copy, are
regexes over param paths "tower/sub/.../leaf" of the one params tree {tower: params}
(`training.trainable`, `training.ema`; see partition.py). The final evaluations come from
evaluators.py, built from the config.

WORKDIR may be a gs:// URI (TPU pods, whose VMs share no disk): every file goes through
`etils.epath`, checkpoint arrays through TensorStore's GCS driver.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from diffusion_jax import checkpoint, parallel, system, xla_defaults
from diffusion_jax.adapters import dreambooth, lora_train
from diffusion_jax.data import buckets, input_pipeline
from diffusion_jax.diffusion import process
from diffusion_jax.training import evaluators, losses, partition
from diffusion_jax.training import frozen as frozen_towers
from diffusion_jax.training import starting_point
from diffusion_jax.training.starting_point import TRAINER_ITEM
from diffusion_jax.training import preflight
from diffusion_jax.training.optimizer import make_optimizer
from diffusion_jax.training.progress import Progress
from diffusion_jax.training.sample_grids import GridSampler
from diffusion_jax.training.state import TrainState, make_eval_step, make_train_step

log = logging.getLogger("diffusion_jax.train")

OPT_ITEM = "optimizer"  # the stage's TrainState minus params/EMA (they are model items)


class TrainingDiverged(RuntimeError):
    """The loss or gradients became NaN/Inf; the last good checkpoint is left as it was."""


class Preempted(RuntimeError):
    """SIGTERM or a cluster preemption notice: a checkpoint was written, rerun to resume."""


# ----------------------------------------------------------------------------- setup


def model_config(config: ml_collections.ConfigDict) -> dict:
    """The checkpoint config: model sections, schedule and tokenizer, as plain JSON values
    (and the `lora` section of a LoRA run, which `export` and `sample` read)."""
    sections = system.checkpoint_config(config)
    checkpoint.fill_t5_vocabularies(sections, config.get("init_from"))
    lora = lora_train.section(config)
    if lora is not None:
        sections[lora_train.ITEM] = {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in lora.items()}
    return sections


def _models(ckpt_config: Mapping[str, Any], dtype, remat_policy: str | None,
            attention_impl: str | None = None) -> system.Models:
    return system.build(system.from_config(ckpt_config), ckpt_config, dtype=dtype,
                        remat_policy=remat_policy, attention_impl=attention_impl)


def _vae_loss(config, ckpt_config: Mapping[str, Any], models) -> losses.LossFn:
    section = config.vae_training
    return losses.vae_loss_fn(models, section.reconstruction_loss, section.kl_weight)


def _diffusion_loss(config, ckpt_config: Mapping[str, Any], models) -> losses.LossFn:
    section = config.training
    db = dreambooth.section(config)
    prior = db["prior_loss_weight"] if db is not None else 0.0
    return losses.diffusion_loss_fn(models, process.from_config(ckpt_config["schedule"]),
                                    min_snr_gamma=section.min_snr_gamma,
                                    offset_noise=section.offset_noise, prior_loss_weight=prior,
                                    embedded_guidance=section.get("embedded_guidance", 3.5))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run, as data: the trainer's loop is the same for every stage."""

    name: str  # metrics prefix, summary keys, the `trainer` item's "stage"
    index: int  # its place in the run: offsets its data seed and its rng
    section: str  # its config section: steps, optimizer, `trainable` (and `ema`) rules
    loss: Callable  # (config, ckpt_config, models) -> LossFn
    batch_size_key: str  # the config key of its global batch
    captions: bool  # False: images only (no caption dropout)
    draws_samples: bool  # sample grids every sample_every_steps
    keeps_best: bool  # its checkpoints carry the eval loss checkpoint.keep_best ranks by
    # The kinds (xla_defaults.PROGRAM_KINDS) whose XLA CPU options its train step and its
    # evaluation compile with.
    program_kinds: tuple[str, str]
    finish: Callable | None = None  # run -> None, once its last step is done

    def steps(self, config) -> int:
        return preflight.stage_steps(config)[self.name]

    def batch_size(self, config) -> int:
        section, key = self.batch_size_key.split(".")
        return config[section][key]

    def trainable(self, config) -> tuple[str, ...]:
        """Regexes over param paths of what the optimizer updates; `train_text_encoder`
        is the shorthand for adding every text tower."""
        section = config[self.section]
        rules = tuple(section.trainable)
        if section.get("train_text_encoder"):
            rules += tuple(f"{name}/.*" for name in system.from_config(config).text_names)
        return rules

    def ema(self, config) -> tuple[float | None, tuple[str, ...]]:
        """(max EMA decay or None for no EMA copy, regexes of the trained params that keep
        one)."""
        section = config[self.section]
        return section.get("ema_decay", 0.0) or None, tuple(section.get("ema", ()))

    def data_config(self, config) -> ml_collections.ConfigDict:
        data = ml_collections.ConfigDict(config.data.to_dict())
        data.seed = config.data.seed + self.index  # each stage its own data order
        data.batch_size = self.batch_size(config)
        if not self.captions:
            data.caption_dropout = 0.0
        return data


def _set_scaling_factor(run: "Run") -> None:
    """SD's 0.18215 is 1/std of its VAE's latents; do the same for the VAE just trained, so
    the U-Net sees unit-variance latents."""
    models = _models(run.ckpt_config, jnp.float32, None)
    batches = input_pipeline.make_eval_batches(
        VAE.data_config(run.config), run.text_inputs, num_examples=1024,
        batch_size=VAE.batch_size(run.config))
    # Replicated out: latents of fsdp-sharded params could be sharded over several hosts,
    # and a host reads only whole (or fully replicated) arrays.
    vae = run.system.vae.name
    unscaled = dataclasses.replace(models, scaling_factor=1.0, shift_factor=0.0)
    encode = jax.jit(lambda p, x, r: system.encode_latents(unscaled, {vae: p}, x, r),
                     out_shardings=parallel.replicated(run.mesh),
                     compiler_options=xla_defaults.compiler_options("vae"))
    rng = jax.random.key(run.config.seed + 31)
    latents = [np.asarray(encode(run.towers[vae], b["image"], jax.random.fold_in(rng, i)))
               for i, b in enumerate(batches)]
    std = float(np.concatenate(latents).std())
    run.ckpt_config[vae]["scaling_factor"] = round(1.0 / std, 5)
    log.info("VAE latent std %.4f: scaling_factor = %.5f", std, 1.0 / std)
    run.summary["vae_scaling_factor"] = run.ckpt_config[vae]["scaling_factor"]


CONTROLNET_DIR = "controlnet"  # WORKDIR/controlnet: a trained ControlNet, as convert writes one


def _host_arrays(tree: Any) -> Any:
    """numpy copies of (maybe sharded, maybe multi-process) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _write_controlnet(run: "Run") -> None:
    """A system with a ControlNet: WORKDIR/controlnet, the ControlNet alone (its EMA params
    where kept) in the format `convert` writes for a ControlNetModel folder, which
    `sample --controlnet` and `export` read. Rewritten each time the stage finishes."""
    tower = next((a for a in run.system.adapters if a.kind == "controlnet"), None)
    if tower is None:
        return
    params = _host_arrays(sampling_params(run)[tower.name])
    out = run.workdir / CONTROLNET_DIR
    if run.is_main:
        if out.exists():
            out.rmtree()
        config = {system.SYSTEM_SECTION: system.CONTROLNET.to_dict(),
                  tower.name: run.ckpt_config[tower.name]}
        checkpoint.create(out, {tower.name: params}, system.checkpoint_config(config))
        log.info("ControlNet checkpoint: %s", out)
    run.summary["controlnet"] = str(out)


VAE = Stage("vae", 0, "vae_training", _vae_loss, batch_size_key="vae_training.batch_size",
            captions=False, draws_samples=False, keeps_best=False, program_kinds=("vae", "vae"),
            finish=_set_scaling_factor)
DIFFUSION = Stage("diffusion", 1, "training", _diffusion_loss, batch_size_key="data.batch_size",
                  captions=True, draws_samples=True, keeps_best=True,
                  program_kinds=("train_step", "forward"), finish=_write_controlnet)
STAGES = (VAE, DIFFUSION)
STAGE = {stage.name: stage for stage in STAGES}


class _StopSignal:
    """SIGTERM (preemptible VMs, schedulers) asks the loop to checkpoint and stop."""

    def __init__(self):
        self.requested = False
        # Several processes: jax.distributed's preemption service catches SIGTERM and
        # checkpointer.reached_preemption(step) stops every process at the same step. A
        # Python handler would replace its C handler, and processes signalled a moment apart
        # would stop at different steps, one saving while another waits in a collective.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: writing a checkpoint, then stopping")
        self.requested = True


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """Everything one `train` call shares between stages."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Any
    text_inputs: system.TextInputs  # prompts -> {ids key: ids}, for every text tower
    checkpointer: checkpoint.TrainingCheckpointer
    writer: Any
    stop: _StopSignal
    ckpt_config: dict  # model_config(config), scaling_factor updated after stage 1
    system: system.System
    towers: dict  # {tower: current params}, the one params tree every stage partitions
    summary: dict
    frozen: tuple[str, ...] = ()  # towers no stage trains: in WORKDIR/frozen, not each step
    ema: dict = dataclasses.field(default_factory=dict)  # {tower: whole tree, EMA leaves in}
    final_results: dict | None = None  # the evaluators' results at the last step, if run there
    _sampler: Any = None

    def sampler(self) -> GridSampler:
        """One sampling pipeline per run (after stage 1 fixed the VAE scaling): compiled once."""
        if self._sampler is None:
            self._sampler = GridSampler(self)
        return self._sampler

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def stage_steps(self, stage: str) -> int:
        return preflight.stage_steps(self.config)[stage]

    def first_step(self, stage: str) -> int:
        """Global step at which the stage named `stage` starts."""
        return sum(s.steps(self.config) for s in STAGES[:STAGE[stage].index])

    def save(self, step: int, stage: Stage, stage_step: int, state: TrainState,
             data_state: dict | None, metrics: Mapping[str, float] | None = None) -> None:
        nonfinite = int(jax.device_get(state.nonfinite_step))
        if nonfinite >= 0:
            raise self.diverged(stage, nonfinite)
        pytrees = {**{n: t for n, t in self.towers.items() if n not in self.frozen},
                   **{name + checkpoint.EMA_SUFFIX: tree for name, tree in self.ema.items()},
                   OPT_ITEM: {"opt_state": state.opt_state, "rng": state.rng}}
        trainer = {"stage": stage.name, "stage_step": stage_step,
                   "data": parallel.every_process(data_state),
                   "scaling_factor": self.ckpt_config[self.system.vae.name]["scaling_factor"]}
        self.checkpointer.save(step, pytrees, {TRAINER_ITEM: trainer},
                               {**self.ckpt_config, **frozen_towers.reference(self.frozen)},
                               metrics)

    def diverged(self, stage: Stage, stage_step: int) -> TrainingDiverged:
        latest = self.checkpointer.latest_step()
        where = (f"the last good checkpoint (step {latest}) in {self.checkpointer.directory} is "
                 "intact" if latest is not None else "no checkpoint had been written yet")
        return TrainingDiverged(
            f"{stage.name} stage: the loss or gradients became NaN/Inf at step "
            f"{self.first_step(stage.name) + stage_step + 1}; training stopped and {where}. "
            "Lower the learning rate, enable grad_clip_norm or check the data, then rerun to "
            "resume.")

    def scalars(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()


def sampling_params(run: Run) -> dict:
    """{tower: params} to sample and evaluate with: the EMA copy of every tower that has one,
    LoRA factors merged in."""
    names = (*run.system.names, *lora_train.adapter_items(run.ckpt_config))
    return lora_train.adapted({name: run.ema.get(name, run.towers[name]) for name in names},
                              run.ckpt_config)


def _check_remote_workdir(workdir: epath.Path) -> None:
    """On GCS, tensorboardX writes events and Orbax deletes old steps with google-cloud-storage
    (gcsfs, which epath needs, is checked by checkpoint.as_path)."""
    from tensorboardX import record_writer

    if checkpoint.is_remote(workdir) and not record_writer.GCS_ENABLED:
        raise ValueError(f"workdir {workdir}: TensorBoard events and checkpoint cleanup on GCS "
                         "need google-cloud-storage; pip install 'diffusion-jax[gcs]'")


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) both stages in `workdir` (local or gs://); returns the summary it
    also prints."""
    from diffusion_jax.pipeline import enable_compilation_cache

    workdir = checkpoint.as_path(workdir)
    _check_remote_workdir(workdir)
    parallel.initialize_distributed()
    latest = preflight.validate(config, workdir)  # before anything is written or compiled
    summary_path = workdir / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    total = sum(preflight.stage_steps(config).values())
    if latest is not None and latest >= total and previous:
        print(f"training in {workdir} is complete (step {latest} of {total}); its checkpoints, "
              "samples and summary.json are left as they are. Raise --config.training.steps "
              "to train further.")
        return previous
    enable_compilation_cache()  # a restarted run skips most compilation
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh(config.mesh)
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(workdir / "tensorboard"))
    ckpt_config = model_config(config)
    towers = system.from_config(ckpt_config)
    names = (*towers.names, *lora_train.adapter_items(ckpt_config))
    checkpointer = checkpoint.TrainingCheckpointer(
        workdir / "checkpoints", pytree_items=(
            *names, *(name + checkpoint.EMA_SUFFIX for name in names), OPT_ITEM),
        json_items=(TRAINER_ITEM,), keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best, best_metric=config.checkpoint.best_metric,
        higher_is_better=evaluators.HIGHER_IS_BETTER[config.checkpoint.best_metric])
    # An extended run keeps the figures of the stages it does not run again.
    run = Run(config=config, workdir=workdir, mesh=mesh,
              text_inputs=system.text_inputs(towers, ckpt_config), checkpointer=checkpointer,
              writer=writer, stop=_StopSignal(), ckpt_config=ckpt_config, system=towers,
              towers={}, summary={**previous, "workdir": str(workdir)},
              frozen=frozen_towers.names(config, ckpt_config))
    start = time.perf_counter()
    try:
        resume = starting_point.start(run)
        for stage in STAGES:
            if stage.steps(config) == 0:
                continue
            if resume is not None and stage.index < STAGE[resume["stage"]].index:
                continue  # finished before the restart
            _run_stage(run, stage, resume if resume and resume["stage"] == stage.name else None)
            resume = None
        checkpointer.wait()
        _final(run)
    finally:
        checkpointer.wait()
        checkpointer.close()
        if writer is not None:
            writer.close()
    run.summary["total_seconds"] = round(time.perf_counter() - start, 1)
    run.summary["peak_rss_gib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    if run.is_main:
        (workdir / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
        print_summary(run.summary)
    return run.summary


# ----------------------------------------------------------------------------- a stage


@dataclasses.dataclass
class StageProgram:
    """A stage's compiled-once train step and the shardings around it. Built from the towers'
    params or from their shapes alone (the preflight lowers it without any param)."""

    loss_fn: losses.LossFn  # (trained, frozen, batch, rng), the whole tree put back together
    trained: dict  # the params the `trainable` rules match: the optimizer updates them
    frozen: dict  # the others, an argument of every step, never donated
    optimizer: Any
    create: Any  # trained params -> a fresh TrainState
    state_shapes: TrainState
    state_sharding: TrainState
    frozen_sharding: Any
    batch_sharding: Any
    step_fn: Any  # jax.jit(train_step) with in/out shardings and the state donated
    traces: list  # one entry per trace: a retrace would mean a recompile
    ema_max_decay: float | None
    trainable: tuple[str, ...]  # the rules that chose `trained`
    ema_select: Callable  # trained params -> the part with EMA copies


def _stage_setup(config, ckpt_config: Mapping[str, Any], stage: Stage, towers: Mapping[str, Any],
                 attention_impl: str | None):
    """(loss_fn, trained params, frozen params, config section, EMA decay) of a stage."""
    dtype = jnp.dtype(config.dtype)
    models = _models(ckpt_config, dtype, config.remat_policy or None, attention_impl)
    section = config[stage.section]
    loss_fn = stage.loss(config, ckpt_config, models)
    if lora_train.section(ckpt_config) is not None:
        loss_fn = lora_train.loss_fn(loss_fn, ckpt_config)
    trained, frozen = partition.split(towers, stage.trainable(config))
    return loss_fn, trained, frozen, section, stage.ema(config)[0]  # 0: no EMA copy at all


def stage_program(config, ckpt_config: Mapping[str, Any], mesh, stage: str,
                  towers: Mapping[str, Any], attention_impl: str | None = None) -> StageProgram:
    """The program of the stage named `stage` over `towers`, {tower: params or shapes}.
    `attention_impl` None: the config's `attention`, else the platform's default (see
    layers.dot_product_attention)."""
    stage = STAGE[stage]
    attention_impl = attention_impl or config.get("attention") or None
    num_steps = stage.steps(config)
    loss_fn, trained, frozen, section, ema_max_decay = _stage_setup(
        config, ckpt_config, stage, towers, attention_impl)
    trainable, ema_rules = stage.trainable(config), stage.ema(config)[1]
    ema_select = lambda params: partition.select(params, ema_rules)

    accumulation = section.get("gradient_accumulation", 1)
    optimizer, learning_rate = make_optimizer(section, num_steps)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 100 + stage.index))
    min_size = config.mesh.fsdp_min_size
    create = lambda params: TrainState.create(params, optimizer, rng,
                                              use_ema=ema_max_decay is not None,
                                              ema_select=ema_select)
    state_shapes = jax.eval_shape(create, trained)
    state_sharding = parallel.param_shardings(state_shapes, mesh, min_size)
    frozen_sharding = parallel.param_shardings(frozen, mesh, min_size)
    batch_sharding = parallel.batch_sharding(mesh)
    train_step = make_train_step(loss_fn, optimizer, learning_rate,
                                 ema_max_decay=ema_max_decay, gradient_accumulation=accumulation,
                                 ema_select=ema_select)
    traces = []

    def traced_train_step(*args):  # runs once per trace
        traces.append(1)
        return train_step(*args)

    step_fn = jax.jit(traced_train_step,
                      in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                      out_shardings=(state_sharding, parallel.replicated(mesh)),
                      donate_argnums=0,
                      compiler_options=xla_defaults.compiler_options(stage.program_kinds[0]))
    return StageProgram(loss_fn, trained, frozen, optimizer, create, state_shapes,
                        state_sharding, frozen_sharding, batch_sharding, step_fn, traces,
                        ema_max_decay, trainable, ema_select)


def _run_stage(run: Run, stage: Stage, resume: dict | None) -> None:
    program = stage_program(run.config, run.ckpt_config, run.mesh, stage.name, run.towers)
    if resume is None:
        state, stage_step, data_state = _fresh_state(program), 0, None
    else:
        state, stage_step, data_state = _resumed_state(run, program, resume)
    if stage_step < stage.steps(run.config):
        state = _train_steps(run, stage, program, state, stage_step, data_state)
    _sync_towers(run, program, state)
    if stage.finish is not None:
        stage.finish(run)


def _fresh_state(program: StageProgram) -> TrainState:
    # Donated: the state takes over the towers' buffers instead of copying them (SD 1.5:
    # 3.4 GB); run.towers is refreshed from the state (_sync_towers) before anything reads
    # it again.
    return jax.jit(program.create, out_shardings=program.state_sharding,
                   donate_argnums=0)(program.trained)


def _resumed_state(run: Run, program: StageProgram, resume: dict
                   ) -> tuple[TrainState, int, dict]:
    """The state, stage step and this process's data iterator state of a checkpoint."""
    shapes, sharding = program.state_shapes, program.state_sharding
    restored = run.checkpointer.restore(resume["step"], {OPT_ITEM: parallel.abstract(
        {"opt_state": shapes.opt_state, "rng": shapes.rng},
        {"opt_state": sharding.opt_state, "rng": sharding.rng})}, [])
    ema = None
    if program.ema_max_decay is not None:  # saved EMA copies, raw params where none was
        source = partition.combine(program.trained, {n: t for n, t in run.ema.items()
                                                     if n in program.trained})
        ema = program.ema_select(partition.select(source, program.trainable))
    # Host scalars: device_put of uncommitted device arrays onto shardings that span
    # processes gives unreadable arrays (see parallel.shard_params).
    state = TrainState(step=np.asarray(resume["stage_step"], np.int32), params=program.trained,
                       opt_state=restored[OPT_ITEM]["opt_state"], ema_params=ema,
                       rng=restored[OPT_ITEM]["rng"], nonfinite_step=np.asarray(-1, np.int32))
    state = jax.device_put(state, sharding)
    states = resume["data"]
    if len(states) != jax.process_count():
        raise ValueError(f"the checkpoint at step {resume['step']} holds the data iterator "
                         f"states of {len(states)} processes, this run has "
                         f"{jax.process_count()}: resume with as many or start a new workdir")
    return state, resume["stage_step"], states[jax.process_index()]


def _stage_data(run: Run, stage: Stage, data_state: dict | None):
    """(train iterator at `data_state`, held-out batches, global batch size) of a stage."""
    data_config = stage.data_config(run.config)
    time_ids_for = lambda size: system.time_ids_fn(run.system, run.ckpt_config, size,
                                                   data_config.aesthetic_score)
    time_ids = time_ids_for(data_config.image_size)
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if dreambooth.section(run.config) is not None and stage is DIFFUSION:
        return dreambooth.stage_data(run, data_config, data_state, time_ids, **where)
    if buckets.enabled(data_config.buckets):  # one compile of the step per bucket shape
        iterator = buckets.make_train_iterator(
            data_config, run.text_inputs, **where,
            time_ids_for=time_ids_for if time_ids is not None else None)
    else:
        iterator = input_pipeline.make_train_iterator(data_config, run.text_inputs, **where,
                                                      time_ids=time_ids)
    if data_state is not None:
        iterator.set_state(data_state)
    eval_batches = input_pipeline.make_eval_batches(
        data_config, run.text_inputs, num_examples=run.config.eval_examples,
        batch_size=data_config.batch_size, time_ids=time_ids)
    return iterator, eval_batches, data_config.batch_size


def _due(stage_step: int, every: int, last: bool) -> bool:
    return stage_step % every == 0 or last


def _train_steps(run: Run, stage: Stage, program: StageProgram, state: TrainState,
                 stage_step: int, data_state: dict | None) -> TrainState:
    """Steps `stage_step`+1 .. the stage's last, with logs, evals, grids and checkpoints."""
    config = run.config
    num_steps, first = stage.steps(config), run.first_step(stage.name)
    if dreambooth.section(config) is not None and stage is DIFFUSION:
        _sync_towers(run, program, state)  # the params the base draws its class images with
    iterator, eval_batches, batch_size = _stage_data(run, stage, data_state)
    eval_fn = jax.jit(make_eval_step(program.loss_fn),
                      compiler_options=xla_defaults.compiler_options(stage.program_kinds[1]))
    log.info("%s stage: steps %d..%d of %d, global batch %d\n%s", stage.name, stage_step + 1,
             num_steps, num_steps, batch_size,
             parallel.describe(state.params, program.state_sharding.params))
    progress = Progress(run, stage.name, stage_step, num_steps, batch_size)
    pending: list = []
    while stage_step < num_steps:
        if run.stop.requested or run.checkpointer.reached_preemption(first + stage_step):
            _stop(run, stage, program, state, stage_step, iterator)
        batch = parallel.global_batch(next(iterator), run.mesh)
        state, metrics = program.step_fn(state, program.frozen, batch)
        stage_step += 1
        pending.append(metrics)
        step, last = first + stage_step, stage_step == num_steps
        if _due(stage_step, config.log_every_steps, last):
            _check_finite(run, stage, state)
            progress.log(step, pending, iterator)
            pending = []
        metrics_for_best = None
        if _due(stage_step, config.eval_every_steps, last):
            with progress.outside_steps():
                eval_loss = _evaluate(run, stage, program, eval_fn, state, eval_batches, step)
            progress.record(step, {"eval_loss": eval_loss})
            if stage.keeps_best:
                metrics_for_best = {"eval_loss": eval_loss}
        if stage.draws_samples and config.sample_every_steps and (
                stage_step % config.sample_every_steps == 0) and not last:
            with progress.outside_steps():
                _sync_towers(run, program, state)
                run.sampler().grid(step, sampling_params(run))  # on every process
        every = config.final_eval.every_steps
        if stage.draws_samples and every and _due(stage_step, every, last):
            with progress.outside_steps():
                _sync_towers(run, program, state)
                results = _run_evaluators(run, step)
            numbers = _numbers(results)
            progress.record(step, numbers)
            metrics_for_best = {**(metrics_for_best or {}), **numbers}
            if last:
                run.final_results = results
        if _due(stage_step, config.checkpoint.every_steps, last):
            with progress.outside_steps():
                _sync_towers(run, program, state)
                run.save(step, stage, stage_step, state, iterator.get_state(), metrics_for_best)
    progress.close()
    for key, value in progress.throughput().items():
        run.summary[f"{stage.name}_{key}"] = value
    run.summary[f"{stage.name}_train_step_compilations"] = len(program.traces)
    run.summary[f"{stage.name}_skipped_examples"] = _skipped(iterator)
    return state


def _stop(run: Run, stage: Stage, program: StageProgram, state: TrainState, stage_step: int,
          iterator) -> None:
    """Checkpoints the step reached (unless just written) and raises Preempted."""
    step = run.first_step(stage.name) + stage_step
    if run.checkpointer.latest_step() != step:
        _sync_towers(run, program, state)
        run.save(step, stage, stage_step, state, iterator.get_state())
    run.checkpointer.wait()
    raise Preempted(f"stopped at step {step} after writing a checkpoint; "
                    "rerun the same command to resume")


def _sync_towers(run: Run, program: StageProgram, state: TrainState) -> None:
    """run.towers (and run.ema) from the state, which holds the trained params' buffers."""
    run.towers = partition.combine(program.frozen, state.params)
    if state.ema_params is not None:
        run.ema.update(partition.combine({n: run.towers[n] for n in state.ema_params},
                                         state.ema_params))


def _eval_params(state: TrainState) -> Any:
    """The trained params with the EMA copies in: the weights we sample with."""
    if state.ema_params is None:
        return state.params
    return partition.combine(state.params, state.ema_params)


def _skipped(iterator) -> dict:
    stats = getattr(iterator, "stats", None)
    stats = stats() if callable(stats) else stats
    return dict(stats or {})


def _check_finite(run: Run, stage: Stage, state: TrainState) -> None:
    nonfinite = int(jax.device_get(state.nonfinite_step))
    if nonfinite >= 0:
        raise run.diverged(stage, nonfinite)


def _evaluate(run: Run, stage: Stage, program: StageProgram, eval_fn, state: TrainState,
              batches, step: int) -> float:
    """Mean loss over the held-out batches at fixed noise, with the weights we sample with;
    logged and put in the summary."""
    params, total = _eval_params(state), 0.0
    rng = jax.random.key(run.config.seed + 7919)
    for i, batch in enumerate(batches):
        local = parallel.global_batch(_process_rows(batch), run.mesh)
        total += float(eval_fn(params, program.frozen, local, jax.random.fold_in(rng, i))["loss"])
    eval_loss = total / max(len(batches), 1)
    run.scalars(step, {"loss": eval_loss}, f"{stage.name}/eval")
    log.info("%s step %d: eval loss %.5f", stage.name, step, eval_loss)
    run.summary[f"{stage.name}_eval_loss"] = round(eval_loss, 6)
    return eval_loss


def _process_rows(batch: Mapping[str, np.ndarray]) -> dict:
    i, n = jax.process_index(), jax.process_count()
    return {k: np.asarray(v)[i::n] for k, v in batch.items()}


# ----------------------------------------------------------------------------- samples, evals


def _run_evaluators(run: Run, step: int) -> dict:
    """The config's evaluators on the weights we sample with (on every process: generation
    spans their devices), logged under eval/ in TensorBoard."""
    results = {}
    for evaluator in evaluators.from_config(run.config):
        results.update(evaluator.evaluate(run.sampler(), sampling_params(run), run.workdir))
    run.scalars(step, _numbers(results), "eval")
    return results


def _numbers(results: Mapping[str, Any]) -> dict[str, float]:
    """The evaluators' numbers (not "skipped: ..." notes or per-class tables)."""
    return {k: v for k, v in results.items() if isinstance(v, (int, float))}


def _final(run: Run) -> None:
    """The final sample grid and the config's evaluators, with the EMA copies (their results
    from the last step where final_eval.every_steps ran them there)."""
    step = run.checkpointer.latest_step()
    run.summary["samples"] = str(run.sampler().grid(step, sampling_params(run)))
    results = run.final_results if run.final_results is not None else _run_evaluators(run, step)
    run.summary.update(results)


def print_summary(summary: Mapping[str, Any]) -> None:
    width = max(map(len, summary)) + 2
    print("\n" + "=" * 30 + " training summary " + "=" * 30)
    for key, value in summary.items():
        print(f"{key:<{width}}{value}")
    print("=" * 78)
