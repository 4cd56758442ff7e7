"""Sample grids and evaluation samples during and after training, drawn by the sampling
pipeline on the training mesh from the params the trainer holds. A run training a ControlNet
draws each grid row (a prompt) under the condition image of one held-out example (row i:
example i), the same at every step."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
from etils import epath

from diffusion_jax import image_files, pipeline
from diffusion_jax.data import conditions, input_pipeline

log = logging.getLogger("diffusion_jax.train")


class GridSampler:
    """Sample grids during and after training: fixed prompts and seeds, from the params the
    run holds, on its mesh with its shardings (no gather, no copy). Every process calls
    `generate` and `grid` (the program spans their devices); process 0 writes the grid."""

    def __init__(self, run):
        """`run`: the trainer's Run (its config, checkpoint config, mesh, workdir, writer)."""
        self.run, self.cfg = run, run.config.sample
        self.pipe = pipeline.StableDiffusion(None, run.ckpt_config, mesh=run.mesh,
                                             fsdp_min_size=run.config.mesh.fsdp_min_size)
        self.control_images = None  # one per prompt of the grid, for a ControlNet
        if self.pipe.controlnet is not None:
            count = len(self.cfg.prompts)
            batch = input_pipeline.make_eval_batches(run.config.data, run.text_inputs,
                                                     num_examples=count, batch_size=count)[0]
            self.control_images = list(batch[conditions.CONDITION_KEY])
        if run.is_main:
            (run.workdir / "samples").mkdir(exist_ok=True)

    def generate(self, prompts: list[str], seeds: list[int], params: Mapping[str, Any],
                 batch: int = 100, control_image: np.ndarray | None = None) -> np.ndarray:
        """`params`: {tower name: params}, as `sampling_params` gives them; `control_image`:
        the ControlNet's image [H, W, 3] in [0, 1] for every one of them."""
        out = []
        control = {} if control_image is None else {"control_image": control_image}
        for i in range(0, len(prompts), batch):
            p, s = prompts[i:i + batch], seeds[i:i + batch]
            pad = batch - len(p) if len(prompts) > batch else 0  # one compiled shape
            images = self.pipe.txt2img(p + p[-1:] * pad, "", seed=s + s[-1:] * pad,
                                       sampler=self.cfg.sampler, steps=self.cfg.steps,
                                       guidance=self.cfg.guidance, params=params, **control)
            out.append(images[:len(p)])
        return np.concatenate(out)

    def _grid_images(self, params: Mapping[str, Any]) -> np.ndarray:
        n = self.cfg.seeds_per_prompt
        if self.control_images is None:
            prompts = [p for p in self.cfg.prompts for _ in range(n)]
            return self.generate(prompts, list(range(n)) * len(self.cfg.prompts), params)
        return np.concatenate([self.generate([prompt] * n, list(range(n)), params,
                                             control_image=image)
                               for prompt, image in zip(self.cfg.prompts, self.control_images)])

    def grid(self, step: int, params: Mapping[str, Any]) -> epath.Path:
        n = self.cfg.seeds_per_prompt
        images = self._grid_images(params)
        path = self.run.workdir / "samples" / f"step_{step:07d}.png"
        if not self.run.is_main:
            return path
        grid = image_files.save_grid(images, path, {
            "prompts": list(self.cfg.prompts), "seeds": list(range(n)), "sampler": self.cfg.sampler,
            "steps": self.cfg.steps, "guidance": self.cfg.guidance, "negative_prompt": "",
            "height": int(images.shape[1]), "width": int(images.shape[2]), "ema": True,
            "training_step": step}, columns=n)
        if self.run.writer is not None:
            self.run.writer.add_image("samples", grid, step, dataformats="HWC")
            self.run.writer.flush()
        log.info("sample grid: %s", path)
        return path
