"""Evaluations of a finished run, built from config (big_vision's `eval_common.from_config`).

    for evaluator in evaluators.from_config(config):
        summary.update(evaluator.evaluate(sampler, params, workdir))

`sampler` draws images (`sampler.generate(prompts, seeds, params)`, uint8 NHWC) from
`params`, {tower name: params} with the EMA copies where the run has them; `evaluate`
returns summary entries. A new metric (FID against a folder, CLIP score) is a new class
here and its key in `from_config`; the trainer only iterates the list.
"""

from __future__ import annotations

import dataclasses
import functools
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
class Fid:
    """FID and KID of `samples` images against `reference`: the bundled Fashion-MNIST test split
    (its first `reference_examples`, resized to `image_size` as training saw them; captions
    cycling through the classes) or what `diffusion-jax fid` takes as a source (an image
    folder, a statistics or features .npz), with `prompts` cycled. KID needs the reference's
    features (not a mu / sigma-only .npz)."""

    samples: int
    reference: str
    reference_examples: int
    image_size: int
    prompts: tuple[str, ...]

    def evaluate(self, sampler, params: Mapping[str, Any], workdir: epath.Path) -> dict:
        from diffusion_jax.eval import fid, kid

        try:
            features = load_inception()
        except (fid.WeightsMissing, OSError, RuntimeError) as e:  # e.g. no network, no pip
            log.warning("FID skipped: %s", e)
            return {"fid": f"skipped: {' '.join(str(e).split())}"}
        if self.reference == fid.DATASET:
            from diffusion_jax.data import fashion_mnist

            prompts = [fashion_mnist.caption(i % len(fashion_mnist.CLASS_NAMES))
                       for i in range(self.samples)]
            reference = fid.fashion_mnist_reference(
                split="test", num_examples=self.reference_examples, image_size=self.image_size,
                features=features)
        else:
            prompts = [self.prompts[i % len(self.prompts)] for i in range(self.samples)]
            reference = fid.source_stats(fid.check_source(self.reference), features)
        images = sampler.generate(prompts, [100_000 + i for i in range(self.samples)], params)
        ours = fid.features_and_statistics(
            [images[i:i + 100] for i in range(0, self.samples, 100)], features)
        value = float(fid.frechet_distance(ours.mu, ours.sigma, reference.mu, reference.sigma))
        result = {"fid_samples": ours.count, "fid": round(value, 3)}
        if self.reference == fid.DATASET:
            result["fid_reference_examples"] = self.reference_examples
        if reference.features is not None:
            mean, std, _ = kid.kernel_inception_distance(ours.features, reference.features)
            result.update(kid=round(mean, 6), kid_std=round(std, 6))
        log.info("FID (%d samples vs %s): %.2f%s", ours.count, self.reference, value,
                 f", KID {result['kid']:.5f}" if "kid" in result else "")
        return result


@dataclasses.dataclass(frozen=True)
class ClipScore:
    """torchmetrics' CLIP score of `samples` images of `prompts` (cycled) under the
    transformers CLIPModel folder `clip_model`."""

    samples: int
    clip_model: str
    prompts: tuple[str, ...]

    def evaluate(self, sampler, params: Mapping[str, Any], workdir: epath.Path) -> dict:
        from diffusion_jax.eval import clip_score

        prompts = [self.prompts[i % len(self.prompts)] for i in range(self.samples)]
        images = sampler.generate(prompts, [200_000 + i for i in range(self.samples)], params)
        result = clip_score.clip_score([list(zip(images, prompts))], _clip_scorer(self.clip_model))
        log.info("CLIP score (%d samples): %.3f", result.count, result.score)
        return {"clip_score": round(result.score, 4), "clip_score_samples": result.count}


@functools.lru_cache(maxsize=None)
def _clip_scorer(clip_model: str):
    """The CLIP model of a folder, loaded and compiled once per process."""
    from diffusion_jax.eval import clip_score

    return clip_score.load_clip(clip_model)


# The metrics evaluators report, and which way is better (checkpoint.best_metric ranks by one).
HIGHER_IS_BETTER = {"eval_loss": False, "fid": False, "kid": False, "class_accuracy": True,
                    "clip_score": True}


def from_config(config) -> list:
    """The evaluators `config.final_eval` asks for (a count of 0 leaves one out)."""
    final = config.final_eval
    prompts = tuple(config.sample.prompts)
    evaluators = []
    if final.samples_per_class:
        evaluators.append(FashionMnistClassAccuracy(final.samples_per_class))
    if final.fid_samples:
        evaluators.append(Fid(final.fid_samples, final.fid_reference,
                              final.fid_reference_examples, config.data.image_size, prompts))
    if final.clip_score_samples:
        evaluators.append(ClipScore(final.clip_score_samples, final.clip_model, prompts))
    return evaluators


def metrics_of(evaluators: list) -> set[str]:
    """The numbers the evaluators put in the summary that a best checkpoint can rank by."""
    names = {FashionMnistClassAccuracy: {"class_accuracy"}, Fid: {"fid", "kid"},
             ClipScore: {"clip_score"}}
    return set().union(*(names[type(e)] for e in evaluators)) if evaluators else set()
