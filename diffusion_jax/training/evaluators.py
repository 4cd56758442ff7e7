"""Evaluations of a finished run, built from config (big_vision's `eval_common.from_config`).

    for evaluator in evaluators.from_config(config):
        summary.update(evaluator.evaluate(sampler, params, workdir))

`sampler` draws images (`sampler.generate(prompts, seeds, params)`, float [0, 1] NHWC) from
`params`, {tower name: params} with the EMA copies where the run has them; `evaluate`
returns summary entries. A new metric (FID against a folder, CLIP score) is a new class
here and its key in `from_config`; the trainer only iterates the list.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np
from etils import epath

log = logging.getLogger("diffusion_jax.train")


@dataclasses.dataclass(frozen=True)
class FashionMnistClassAccuracy:
    """The demo's stand-in for CLIP score: how many samples prompted with a Fashion-MNIST
    class caption a classifier trained on the real images recognises as that class."""

    samples_per_class: int

    def evaluate(self, sampler, params: Mapping[str, Any], workdir: epath.Path) -> dict:
        from diffusion_jax.data import fashion_mnist
        from diffusion_jax.eval import classifier

        labels = [c for c in range(len(fashion_mnist.CLASS_NAMES))
                  for _ in range(self.samples_per_class)]
        images = sampler.generate([fashion_mnist.caption(c) for c in labels],
                                  list(range(len(labels))), params)
        classifier_params = classifier.load_or_train(workdir / "classifier.safetensors")
        result = classifier.conditional_accuracy(classifier_params, images, np.asarray(labels))
        log.info("samples recognised as the prompted class: %.1f%%", 100 * result["accuracy"])
        return {"class_accuracy": round(float(result["accuracy"]), 4),
                "class_accuracy_per_class": {k: round(float(v), 3)
                                             for k, v in result["per_class"].items()}}


def load_inception():
    """The FID Inception; fetches and converts its weights once when missing
    (`diffusion-jax fid --setup` does the same by hand)."""
    from diffusion_jax.eval import fid, inception

    try:
        return fid.load_inception()
    except fid.WeightsMissing:
        log.info("FID Inception weights are not set up: fetching and converting them once")
        inception.setup_weights()
        return fid.load_inception()


@dataclasses.dataclass(frozen=True)
class FashionMnistFid:
    """FID of samples (captions cycling through the classes) against the test split."""

    samples: int
    reference_examples: int
    image_size: int

    def evaluate(self, sampler, params: Mapping[str, Any], workdir: epath.Path) -> dict:
        from diffusion_jax.data import fashion_mnist
        from diffusion_jax.eval import fid

        try:
            features = load_inception()
        except (fid.WeightsMissing, OSError, RuntimeError) as e:  # e.g. no network, no pip
            log.warning("FID skipped: %s", e)
            return {"fid": f"skipped: {' '.join(str(e).split())}"}
        labels = [i % len(fashion_mnist.CLASS_NAMES) for i in range(self.samples)]
        images = sampler.generate([fashion_mnist.caption(c) for c in labels],
                                  [100_000 + i for i in range(self.samples)], params)
        mu, sigma, n = fid.statistics([images[i:i + 100] for i in range(0, self.samples, 100)],
                                      features)
        ref_mu, ref_sigma = fid.reference_statistics_fashion_mnist(
            split="test", num_examples=self.reference_examples, image_size=self.image_size,
            features=features)
        value = float(fid.frechet_distance(mu, sigma, ref_mu, ref_sigma))
        log.info("FID (%d samples vs %d Fashion-MNIST test images): %.2f", n,
                 self.reference_examples, value)
        return {"fid_samples": n, "fid_reference_examples": self.reference_examples,
                "fid": round(value, 3)}


def from_config(config) -> list:
    """The evaluators `config.final_eval` asks for (a count of 0 leaves one out)."""
    final = config.final_eval
    evaluators = []
    if final.samples_per_class:
        evaluators.append(FashionMnistClassAccuracy(final.samples_per_class))
    if final.fid_samples:
        evaluators.append(FashionMnistFid(final.fid_samples, final.fid_reference_examples,
                                          config.data.image_size))
    return evaluators
