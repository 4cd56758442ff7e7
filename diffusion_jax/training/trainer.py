"""The training loop: stage 1 trains the VAE, stage 2 the latent-diffusion U-Net.

One checkpoint directory (WORKDIR/checkpoints) numbers steps across both stages (the VAE
stage takes steps 1..N1, the U-Net stage N1+1..N1+N2); every step directory is a complete
diffusion_jax checkpoint (all three towers + config) plus what resuming needs (optimizer
state, the `trainer` JSON with the stage and the data iterator state). A restarted run picks
up from the newest step and sees exactly the batches and randomness it would have seen.

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
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from diffusion_jax import checkpoint, parallel, system
from diffusion_jax.data import pipeline as data_pipeline
from diffusion_jax.diffusion.schedule import Schedule
from diffusion_jax.models import COMPONENTS
from diffusion_jax.tokenizer import CLIPTokenizer
from diffusion_jax.training import losses
from diffusion_jax.training import preflight
from diffusion_jax.training.optimizer import make_optimizer
from diffusion_jax.training.progress import Progress
from diffusion_jax.training.state import TrainState, make_eval_step, make_train_step

log = logging.getLogger("diffusion_jax.train")

TOWERS = ("unet", "vae", "text_encoder")
STAGES = ("vae", "diffusion")
TRAINER_ITEM = "trainer"
OPT_ITEM = "optimizer"  # the stage's TrainState minus params/EMA (they are model items)


class TrainingDiverged(RuntimeError):
    """The loss or gradients became NaN/Inf; the last good checkpoint is left as it was."""


class Preempted(RuntimeError):
    """SIGTERM or a cluster preemption notice: a checkpoint was written, rerun to resume."""


# ----------------------------------------------------------------------------- setup


def model_config(config: ml_collections.ConfigDict) -> dict:
    """The checkpoint config: model sections, schedule and tokenizer, as plain JSON values."""
    return {name: json.loads(config[name].to_json()) for name in checkpoint.CONFIG_SECTIONS}


def _models(cfg: Mapping[str, Any], dtype, remat_policy: str | None,
            attention_impl: str | None = None) -> system.Models:
    return system.build(system.from_config(cfg), cfg, dtype=dtype, remat_policy=remat_policy,
                        attention_impl=attention_impl)


def _stage_data_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.seed = config.data.seed + STAGES.index(stage)  # each stage its own data order
    if stage == "vae":
        data.caption_dropout = 0.0
        data.batch_size = config.vae_training.batch_size
    return data


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


def _every_process(value: Any) -> list:
    """[process 0's value, process 1's, ...] of a JSON value on every process. Orbax writes
    JSON items from process 0 only, so per-process state (the data iterators) goes in as a
    list that each process indexes on restore."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([data.size])).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)  # allgather takes one shape everywhere
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """Everything one `train` call shares between stages."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Any
    tokenizer: CLIPTokenizer
    checkpointer: checkpoint.TrainingCheckpointer
    writer: Any
    stop: _StopSignal
    ckpt_config: dict  # model_config(config), scaling_factor updated after stage 1
    towers: dict  # current params of unet / vae / text_encoder (+ unet_ema)
    summary: dict
    _sampler: Any = None

    def sampler(self) -> "_Sampler":
        """One sampling pipeline per run (after stage 1 fixed the VAE scaling): compiled once."""
        if self._sampler is None:
            self._sampler = _Sampler(self)
        return self._sampler

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def stage_steps(self, stage: str) -> int:
        return preflight.stage_steps(self.config)[stage]

    def first_step(self, stage: str) -> int:
        """Global step at which `stage` starts."""
        return sum(self.stage_steps(s) for s in STAGES[:STAGES.index(stage)])

    def save(self, step: int, stage: str, stage_step: int, state: TrainState,
             data_state: dict | None, metrics: Mapping[str, float] | None = None) -> None:
        nonfinite = int(jax.device_get(state.nonfinite_step))
        if nonfinite >= 0:
            raise self.diverged(stage, nonfinite)
        pytrees = dict(self.towers)
        pytrees[OPT_ITEM] = {"opt_state": state.opt_state, "rng": state.rng}
        trainer = {"stage": stage, "stage_step": stage_step, "data": _every_process(data_state),
                   "scaling_factor": self.ckpt_config["vae"]["scaling_factor"]}
        self.checkpointer.save(step, pytrees, {TRAINER_ITEM: trainer}, self.ckpt_config, metrics)

    def diverged(self, stage: str, stage_step: int) -> TrainingDiverged:
        latest = self.checkpointer.latest_step()
        where = (f"the last good checkpoint (step {latest}) in {self.checkpointer.directory} is "
                 "intact" if latest is not None else "no checkpoint had been written yet")
        return TrainingDiverged(
            f"{stage} stage: the loss or gradients became NaN/Inf at step "
            f"{self.first_step(stage) + stage_step + 1}; training stopped and {where}. Lower "
            "the learning rate, enable grad_clip_norm or check the data, then rerun to resume.")

    def scalars(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()


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
    checkpointer = checkpoint.TrainingCheckpointer(
        workdir / "checkpoints", pytree_items=(*TOWERS, "unet_ema", OPT_ITEM),
        json_items=(TRAINER_ITEM,), keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best)
    # An extended run keeps the figures of the stages it does not run again.
    run = Run(config=config, workdir=workdir, mesh=mesh,
              tokenizer=CLIPTokenizer.bundled(**config.tokenizer), checkpointer=checkpointer,
              writer=writer, stop=_StopSignal(), ckpt_config=ckpt_config, towers={},
              summary={**previous, "workdir": str(workdir)})
    start = time.perf_counter()
    try:
        resume = _resume_point(run)
        for stage in STAGES:
            if run.stage_steps(stage) == 0:
                continue
            if resume is not None and STAGES.index(stage) < STAGES.index(resume["stage"]):
                continue  # finished before the restart
            _run_stage(run, stage, resume if resume and resume["stage"] == stage else None)
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


def _resume_point(run: Run) -> dict | None:
    """Loads the towers from the newest checkpoint (or initialises them) and says where the
    interrupted stage stands; None on a fresh run."""
    step = run.checkpointer.latest_step()
    shardings = lambda tree: parallel.param_shardings(tree, run.mesh, run.config.mesh.fsdp_min_size)
    if step is None:
        config = run.config
        towers = checkpoint.initial_params(run.ckpt_config, seed=config.seed,
                                           init_from=config.init_from,
                                           from_checkpoint=config.get("init_towers", TOWERS))
        run.towers = parallel.shard_params(towers, shardings(towers))
        return None
    names = checkpoint.item_names(run.checkpointer.directory, step)
    templates = {name: COMPONENTS[name].param_shapes(
        COMPONENTS[name].config_from_dict(run.ckpt_config[name])) for name in TOWERS}
    if "unet_ema" in names:
        templates["unet_ema"] = templates["unet"]
    restored = run.checkpointer.restore(
        step, {n: parallel.abstract(t, shardings(t)) for n, t in templates.items()}, [TRAINER_ITEM])
    run.towers = {name: restored[name] for name in templates}
    trainer = restored[TRAINER_ITEM]
    run.ckpt_config["vae"]["scaling_factor"] = trainer["scaling_factor"]
    log.info("resuming from %s step %d (%s stage, step %d of %d)", run.checkpointer.directory,
             step, trainer["stage"], trainer["stage_step"], run.stage_steps(trainer["stage"]))
    return {**trainer, "step": step}


# ----------------------------------------------------------------------------- a stage


@dataclasses.dataclass
class StageProgram:
    """A stage's compiled-once train step and the shardings around it. Built from the towers'
    params or from their shapes alone (the preflight lowers it without any param)."""

    loss_fn: losses.LossFn
    trained: dict  # the towers the optimizer updates
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


def _stage_setup(config, ckpt_config: Mapping[str, Any], stage: str, towers: Mapping[str, Any],
                 attention_impl: str | None):
    """(loss_fn, trained params, frozen params, optimizer section, EMA decay) of a stage."""
    dtype = jnp.dtype(config.dtype)
    models = _models(ckpt_config, dtype, config.remat_policy or None, attention_impl)
    if stage == "vae":
        cfg = config.vae_training
        loss_fn = losses.vae_loss_fn(models.vae, cfg.reconstruction_loss, cfg.kl_weight)
        return loss_fn, {"vae": towers["vae"]}, {}, cfg, None
    cfg = config.training
    loss_fn = losses.diffusion_loss_fn(models, Schedule.from_config(ckpt_config["schedule"]),
                                       min_snr_gamma=cfg.min_snr_gamma,
                                       offset_noise=cfg.offset_noise)
    trained_names = ("unet", "text_encoder") if cfg.train_text_encoder else ("unet",)
    trained = {n: towers[n] for n in trained_names}
    frozen = {n: towers[n] for n in TOWERS if n not in trained_names}
    return loss_fn, trained, frozen, cfg, cfg.ema_decay or None  # 0: no EMA copy at all


def stage_program(config, ckpt_config: Mapping[str, Any], mesh, stage: str,
                  towers: Mapping[str, Any], attention_impl: str | None = None) -> StageProgram:
    """`attention_impl` None: the platform's default (see layers.multi_head_attention)."""
    num_steps = preflight.stage_steps(config)[stage]
    loss_fn, trained, frozen, cfg, ema_max_decay = _stage_setup(config, ckpt_config, stage, towers,
                                                                attention_impl)
    accumulation = cfg.get("gradient_accumulation", 1)
    optimizer, learning_rate = make_optimizer(cfg, num_steps)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 100 + STAGES.index(stage)))
    min_size = config.mesh.fsdp_min_size
    create = lambda params: TrainState.create(params, optimizer, rng, use_ema=ema_max_decay is not None)
    state_shapes = jax.eval_shape(create, trained)
    state_sharding = parallel.param_shardings(state_shapes, mesh, min_size)
    frozen_sharding = parallel.param_shardings(frozen, mesh, min_size)
    batch_sharding = parallel.batch_sharding(mesh)
    train_step = make_train_step(loss_fn, optimizer, learning_rate, ema_max_decay=ema_max_decay,
                                 gradient_accumulation=accumulation)
    traces = []

    def traced_train_step(*args):  # runs once per trace
        traces.append(1)
        return train_step(*args)

    step_fn = jax.jit(traced_train_step,
                      in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                      out_shardings=(state_sharding, parallel.replicated(mesh)),
                      donate_argnums=0)
    return StageProgram(loss_fn, trained, frozen, optimizer, create, state_shapes, state_sharding,
                        frozen_sharding, batch_sharding, step_fn, traces, ema_max_decay)


def _run_stage(run: Run, stage: str, resume: dict | None) -> None:
    config, mesh = run.config, run.mesh
    num_steps, first = run.stage_steps(stage), run.first_step(stage)
    program = stage_program(config, run.ckpt_config, mesh, stage, run.towers)
    trained, frozen, state_sharding = program.trained, program.frozen, program.state_sharding
    ema_max_decay, state_shapes, step_fn = program.ema_max_decay, program.state_shapes, program.step_fn
    if resume is None:
        # Donated: the state takes over the towers' buffers instead of copying them (SD 1.5:
        # 3.4 GB); run.towers is refreshed from the state before anything reads it again.
        state = jax.jit(program.create, out_shardings=state_sharding, donate_argnums=0)(trained)
        stage_step, data_state = 0, None
    else:
        restored = run.checkpointer.restore(resume["step"], {OPT_ITEM: parallel.abstract(
            {"opt_state": state_shapes.opt_state, "rng": state_shapes.rng},
            {"opt_state": state_sharding.opt_state, "rng": state_sharding.rng})}, [])
        ema = {"unet": run.towers["unet_ema"]} if ema_max_decay is not None else None
        if ema is not None and "text_encoder" in trained:
            ema["text_encoder"] = trained["text_encoder"]
        # Host scalars: device_put of uncommitted device arrays onto shardings that span
        # processes gives unreadable arrays (see parallel.shard_params).
        state = TrainState(step=np.asarray(resume["stage_step"], np.int32), params=trained,
                           opt_state=restored[OPT_ITEM]["opt_state"],
                           ema_params=ema, rng=restored[OPT_ITEM]["rng"],
                           nonfinite_step=np.asarray(-1, np.int32))
        state = jax.device_put(state, state_sharding)
        states = resume["data"]
        if len(states) != jax.process_count():
            raise ValueError(f"the checkpoint at step {resume['step']} holds the data iterator "
                             f"states of {len(states)} processes, this run has "
                             f"{jax.process_count()}: resume with as many or start a new workdir")
        stage_step, data_state = resume["stage_step"], states[jax.process_index()]
    if stage_step >= num_steps:
        _finish_stage(run, stage, state)
        return

    traces = program.traces
    eval_fn = jax.jit(make_eval_step(program.loss_fn))
    data_config = _stage_data_config(config, stage)
    iterator = data_pipeline.make_train_iterator(
        data_config, run.tokenizer, process_index=jax.process_index(),
        process_count=jax.process_count())
    if data_state is not None:
        iterator.set_state(data_state)
    eval_batches = data_pipeline.make_eval_batches(
        data_config, run.tokenizer, num_examples=config.eval_examples,
        batch_size=data_config.batch_size)

    log.info("%s stage: steps %d..%d of %d, global batch %d\n%s", stage, stage_step + 1,
             num_steps, num_steps, data_config.batch_size,
             parallel.describe(state.params, state_sharding.params))
    progress = Progress(run, stage, stage_step, num_steps, data_config.batch_size)
    pending: list = []
    while stage_step < num_steps:
        if run.stop.requested or run.checkpointer.reached_preemption(first + stage_step):
            if run.checkpointer.latest_step() != first + stage_step:
                run.towers.update(_towers_from_state(stage, state))
                run.save(first + stage_step, stage, stage_step, state, iterator.get_state())
            run.checkpointer.wait()
            raise Preempted(f"stopped at step {first + stage_step} after writing a checkpoint; "
                            "rerun the same command to resume")
        batch = parallel.global_batch(next(iterator), mesh)
        state, metrics = step_fn(state, frozen, batch)
        stage_step += 1
        pending.append(metrics)
        step, last = first + stage_step, stage_step == num_steps
        if stage_step % config.log_every_steps == 0 or last:
            _check_finite(run, stage, state)
            progress.log(step, pending, iterator)
            pending = []
        metrics_for_best = None
        if stage_step % config.eval_every_steps == 0 or last:
            with progress.outside_steps():
                eval_loss = _eval_loss(run, eval_fn, state, frozen, eval_batches)
            run.scalars(step, {"loss": eval_loss}, f"{stage}/eval")
            progress.record(step, {"eval_loss": eval_loss})
            log.info("%s step %d: eval loss %.5f", stage, step, eval_loss)
            run.summary[f"{stage}_eval_loss"] = round(eval_loss, 6)
            if stage == "diffusion":
                metrics_for_best = {"eval_loss": eval_loss}
        if stage == "diffusion" and config.sample_every_steps and (
                stage_step % config.sample_every_steps == 0) and not last:
            with progress.outside_steps():
                towers = _host_towers(run, _ema_or_params(state)["unet"])  # on every process
                if run.is_main:
                    run.sampler().grid(step, towers)
        if stage_step % config.checkpoint.every_steps == 0 or last:
            with progress.outside_steps():
                run.towers.update(_towers_from_state(stage, state))
                run.save(step, stage, stage_step, state, iterator.get_state(), metrics_for_best)
    progress.close()
    for key, value in progress.throughput().items():
        run.summary[f"{stage}_{key}"] = value
    run.summary[f"{stage}_train_step_compilations"] = len(traces)
    run.summary[f"{stage}_skipped_examples"] = _skipped(iterator)
    _finish_stage(run, stage, state)


def _ema_or_params(state: TrainState) -> Any:
    return state.ema_params if state.ema_params is not None else state.params


def _towers_from_state(stage: str, state: TrainState) -> dict:
    towers = dict(state.params)
    if stage == "diffusion" and state.ema_params is not None:
        towers["unet_ema"] = state.ema_params["unet"]
    return towers


def _skipped(iterator) -> dict:
    stats = getattr(iterator, "stats", None)
    stats = stats() if callable(stats) else stats
    return dict(stats or {})


def _check_finite(run: Run, stage: str, state: TrainState) -> None:
    nonfinite = int(jax.device_get(state.nonfinite_step))
    if nonfinite >= 0:
        raise run.diverged(stage, nonfinite)


def _eval_loss(run: Run, eval_fn, state: TrainState, frozen, batches) -> float:
    """Mean loss over the held-out batches at fixed noise, with the weights we sample with."""
    params, total = _ema_or_params(state), 0.0
    rng = jax.random.key(run.config.seed + 7919)
    for i, batch in enumerate(batches):
        local = parallel.global_batch(_process_rows(batch), run.mesh)
        total += float(eval_fn(params, frozen, local, jax.random.fold_in(rng, i))["loss"])
    return total / max(len(batches), 1)


def _process_rows(batch: Mapping[str, np.ndarray]) -> dict:
    i, n = jax.process_index(), jax.process_count()
    return {k: np.asarray(v)[i::n] for k, v in batch.items()}


def _finish_stage(run: Run, stage: str, state: TrainState) -> None:
    run.towers.update(_towers_from_state(stage, state))
    if stage == "vae":
        _set_scaling_factor(run)


def _set_scaling_factor(run: Run) -> None:
    """SD's 0.18215 is 1/std of its VAE's latents; do the same for the VAE just trained, so
    the U-Net sees unit-variance latents."""
    models = _models(run.ckpt_config, jnp.float32, None)
    batches = data_pipeline.make_eval_batches(
        _stage_data_config(run.config, "vae"), run.tokenizer, num_examples=1024,
        batch_size=run.config.vae_training.batch_size)
    # Replicated out: latents of fsdp-sharded params could be sharded over several hosts,
    # and a host reads only whole (or fully replicated) arrays.
    encode = jax.jit(lambda p, x, r: system.encode_latents(
        dataclasses.replace(models, scaling_factor=1.0), {models.system.vae.name: p}, x, r),
        out_shardings=parallel.replicated(run.mesh))
    rng = jax.random.key(run.config.seed + 31)
    latents = [np.asarray(encode(run.towers["vae"], b["image"], jax.random.fold_in(rng, i)))
               for i, b in enumerate(batches)]
    std = float(np.concatenate(latents).std())
    run.ckpt_config["vae"]["scaling_factor"] = round(1.0 / std, 5)
    log.info("VAE latent std %.4f: scaling_factor = %.5f", std, 1.0 / std)
    run.summary["vae_scaling_factor"] = run.ckpt_config["vae"]["scaling_factor"]


def _host_towers(run: Run, unet: Any) -> dict:
    """Whole host (numpy) copies of the three towers, `unet` as the U-Net's params. Every
    process must call it: params sharded over several hosts' devices are whole on none, so
    they are gathered with a collective (leaf by leaf: one leaf's copy on each device at a
    time)."""
    from jax.experimental import multihost_utils

    towers = {**run.towers, "unet": unet}
    return multihost_utils.process_allgather({n: towers[n] for n in TOWERS}, tiled=True)


class _Sampler:
    """Sample grids during and after training: fixed prompts and seeds, EMA weights."""

    def __init__(self, run: Run):
        from diffusion_jax import pipeline

        self.run, self.cfg = run, run.config.sample
        shapes = {n: COMPONENTS[n].param_shapes(COMPONENTS[n].config_from_dict(run.ckpt_config[n]))
                  for n in TOWERS}
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        self.pipe = pipeline.StableDiffusion(zeros, run.ckpt_config)
        self.replicated = jax.sharding.NamedSharding(self.pipe.mesh, jax.sharding.PartitionSpec())
        (run.workdir / "samples").mkdir(exist_ok=True)

    def set_params(self, host_towers: Mapping[str, Any]) -> None:
        """`host_towers` from _host_towers."""
        self.pipe.params = jax.device_put(dict(host_towers), self.replicated)

    def generate(self, prompts: list[str], seeds: list[int], batch: int = 100) -> np.ndarray:
        out = []
        for i in range(0, len(prompts), batch):
            p, s = prompts[i:i + batch], seeds[i:i + batch]
            pad = batch - len(p) if len(prompts) > batch else 0  # one compiled shape
            images = self.pipe.txt2img(p + p[-1:] * pad, "", seed=s + s[-1:] * pad,
                                       sampler=self.cfg.sampler, steps=self.cfg.steps,
                                       guidance=self.cfg.guidance)
            out.append(images[:len(p)])
        return np.concatenate(out)

    def grid(self, step: int, host_towers: Mapping[str, Any]) -> epath.Path:
        from diffusion_jax import pipeline

        self.set_params(host_towers)
        n = self.cfg.seeds_per_prompt
        prompts = [p for p in self.cfg.prompts for _ in range(n)]
        seeds = [i for _ in self.cfg.prompts for i in range(n)]
        images = self.generate(prompts, seeds)
        path = self.run.workdir / "samples" / f"step_{step:07d}.png"
        grid = pipeline.save_grid(images, path, {
            "prompts": list(self.cfg.prompts), "seeds": list(range(n)), "sampler": self.cfg.sampler,
            "steps": self.cfg.steps, "guidance": self.cfg.guidance, "negative_prompt": "",
            "height": int(images.shape[1]), "width": int(images.shape[2]), "ema": True,
            "training_step": step}, columns=n)
        if self.run.writer is not None:
            self.run.writer.add_image("samples", grid, step, dataformats="HWC")
            self.run.writer.flush()
        log.info("sample grid: %s", path)
        return path


def _final(run: Run) -> None:
    """Sample grid, class accuracy of samples and FID, with the final EMA U-Net: every process
    gathers the params, process 0 uses them."""
    if "unet_ema" not in run.towers and "unet" not in run.towers:
        return
    towers = _host_towers(run, run.towers.get("unet_ema", run.towers["unet"]))
    if not run.is_main:
        return
    sampler = run.sampler()
    step = run.checkpointer.latest_step()
    run.summary["samples"] = str(sampler.grid(step, towers))
    final = run.config.final_eval
    if final.samples_per_class:
        from diffusion_jax.data import fashion_mnist
        from diffusion_jax.eval import classifier

        labels = [c for c in range(len(fashion_mnist.CLASS_NAMES))
                  for _ in range(final.samples_per_class)]
        images = sampler.generate([fashion_mnist.caption(c) for c in labels],
                                  list(range(len(labels))))
        params = classifier.load_or_train(run.workdir / "classifier.safetensors")
        result = classifier.conditional_accuracy(params, images, np.asarray(labels))
        run.summary["class_accuracy"] = round(float(result["accuracy"]), 4)
        run.summary["class_accuracy_per_class"] = {
            k: round(float(v), 3) for k, v in result["per_class"].items()}
        log.info("samples recognised as the prompted class: %.1f%%", 100 * result["accuracy"])
    if final.fid_samples:
        run.summary["fid"] = _fid(run, sampler, final.fid_samples)


def _load_inception():
    """The FID Inception; converts its weights once when missing and torch is there to read
    the TorchScript file (`diffusion-jax fid --setup` does the same by hand)."""
    import importlib.util

    from diffusion_jax.eval import fid, inception

    try:
        return fid.load_inception()
    except fid.WeightsMissing:
        if importlib.util.find_spec("torch") is None:
            raise
        log.info("FID Inception weights are not set up: fetching and converting them once")
        inception.setup_weights()
        return fid.load_inception()


def _fid(run: Run, sampler: _Sampler, count: int) -> float | str:
    from diffusion_jax.data import fashion_mnist
    from diffusion_jax.eval import fid

    try:
        features = _load_inception()
    except (fid.WeightsMissing, OSError, RuntimeError) as e:  # e.g. no torch, no network
        log.warning("FID skipped: %s", e)
        return f"skipped: {' '.join(str(e).split())}"
    labels = [i % len(fashion_mnist.CLASS_NAMES) for i in range(count)]
    images = sampler.generate([fashion_mnist.caption(c) for c in labels],
                              [100_000 + i for i in range(count)])
    mu, sigma, n = fid.statistics([images[i:i + 100] for i in range(0, count, 100)], features)
    reference = run.config.final_eval.fid_reference_examples
    ref_mu, ref_sigma = fid.reference_statistics_fashion_mnist(
        split="test", num_examples=reference, image_size=run.config.data.image_size,
        features=features)
    value = float(fid.frechet_distance(mu, sigma, ref_mu, ref_sigma))
    log.info("FID (%d samples vs %d Fashion-MNIST test images): %.2f", n, reference, value)
    run.summary["fid_samples"] = n
    run.summary["fid_reference_examples"] = reference
    return round(value, 3)


def print_summary(summary: Mapping[str, Any]) -> None:
    width = max(map(len, summary)) + 2
    print("\n" + "=" * 30 + " training summary " + "=" * 30)
    for key, value in summary.items():
        print(f"{key:<{width}}{value}")
    print("=" * 78)
