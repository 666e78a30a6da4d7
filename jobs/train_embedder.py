"""Fine-tune an embedder by metric learning (Approach 1), locally or as a Ray Train job.

    python -m jobs.train_embedder --data FOLDER --output OUT [--loss multi-similarity|triplet|supcon]
                                  [--backbone timm:tf_efficientnet_lite0] [--steps 300] [--input-size 128]
                                  [--ray --num-workers N [--use-gpu]]

FOLDER holds one sub-folder of images per class (``jobs.evaluate`` writes its gallery split so).
Batches are class-balanced (``--classes-per-batch`` x ``--per-class``); the loss is the
multi-similarity loss (default: it beat triplet loss on both datasets measured, see docs/QUALITY.md), the
triplet loss with batch-hard (or semi-hard) mining, or the supervised contrastive loss.
``--average-from STEP`` saves the mean of the weights after every step past STEP (stochastic weight
averaging) instead of the last ones. ``OUT/checkpoint.pt`` is written every ``--checkpoint-every``
steps and a re-run resumes from it (raise ``--steps`` to train longer). The result,
``OUT/embedder.safetensors``, is an embedder spec: ``timm:<backbone>@OUT/embedder.safetensors``
(printed at the end, and in ``OUT/summary.json``).

``--ray`` runs the same loop in Ray Train's TorchTrainer (one worker per GPU with ``--use-gpu``,
gradients averaged by DistributedDataParallel); OUT must then be on storage every worker sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.datasets import list_labelled_images
from pipeline.files import check_output_folder, write_json_atomically
from pipeline.models import select_runtime
from pipeline.training import LOSSES, MINING, TrainConfig, train

logger = logging.getLogger("jobs.train_embedder")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m jobs.train_embedder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="folder with one sub-folder of images per class")
    parser.add_argument("--output", required=True, type=Path, help="checkpoint, embedder and summary folder")
    parser.add_argument("--backbone", default=defaults.backbone,
                        help=f"timm spec to start from (default: {defaults.backbone}; @random: from scratch)")
    parser.add_argument("--dim", type=int, default=defaults.dim, help=f"embedding size (default: {defaults.dim})")
    parser.add_argument("--input-size", type=int, help="pixels (square) to train and embed at (default: the model's)")
    parser.add_argument("--loss", choices=LOSSES, default=defaults.loss, help=f"default: {defaults.loss}")
    parser.add_argument("--margin", type=float, default=defaults.margin, help="triplet margin")
    parser.add_argument("--mining", choices=MINING, default=defaults.mining, help="triplet mining")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="supcon temperature")
    parser.add_argument("--classes-per-batch", type=int, default=defaults.classes_per_batch)
    parser.add_argument("--per-class", type=int, default=defaults.per_class)
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"total steps (default: {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--augment", default=defaults.augment,
                        help="per training image: a comma list of crop (random 50-100 %% crop, resized back), "
                             "flip (left-right; not for digits or text) and erase (half the images get a random "
                             f"rectangle of noise), or none (default: {defaults.augment})")
    parser.add_argument("--classify", type=float, default=defaults.classify,
                        help="weight of a cross-entropy term (cosine classifier over the embedding, one learned "
                             f"vector per class) beside the metric loss; 0: off (default: {defaults.classify})")
    parser.add_argument("--average-from", type=int, default=defaults.average_from, metavar="STEP",
                        help="save the mean of the weights after every step past STEP instead of the last weights "
                             "(stochastic weight averaging); 0: off (default: 0)")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--device", default="auto", help="local runs: auto, cpu, cuda[:N]")
    parser.add_argument("--ray", action="store_true", help="run as a Ray Train job (TorchTrainer)")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (default: 1)")
    parser.add_argument("--use-gpu", action="store_true", help="Ray Train: one GPU per worker")
    args = parser.parse_args(argv)
    if problem := check_output_folder(args.output):
        parser.error(problem)
    if args.checkpoint_every < 1 or args.num_workers < 1:
        parser.error("--checkpoint-every and --num-workers must be >= 1")
    return args


def config_from(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(backbone=args.backbone, dim=args.dim, input_size=args.input_size, loss=args.loss,
                       margin=args.margin, mining=args.mining, temperature=args.temperature,
                       classes_per_batch=args.classes_per_batch, per_class=args.per_class, steps=args.steps,
                       lr=args.lr, seed=args.seed, augment=args.augment, classify=args.classify,
                       average_from=args.average_from)


def _train_worker(loop_config: dict) -> None:
    """One Ray Train worker: the same loop, on this worker's device, wrapped in DDP."""
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    autocast = None
    if device.type == "cuda":
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    summary = train(TrainConfig(**loop_config["config"]), loop_config["paths"], loop_config["labels"],
                    Path(loop_config["output"]), str(device), autocast_dtype=autocast,
                    rank=context.get_world_rank(), wrap_model=ray.train.torch.prepare_model,
                    report=lambda metrics: ray.train.report(metrics),
                    checkpoint_every=loop_config["checkpoint_every"])
    if context.get_world_rank() == 0:
        write_json_atomically(summary, Path(loop_config["output"]) / "worker0_summary.json")


def run_on_ray(config: TrainConfig, paths: list[str], labels: list[str], output: Path, num_workers: int,
               use_gpu: bool, checkpoint_every: int) -> dict:
    """Runs the loop in a TorchTrainer; returns rank 0's summary."""
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": dataclasses.asdict(config), "paths": paths, "labels": labels,
                           "output": str(output.resolve()), "checkpoint_every": checkpoint_every},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name="train_embedder", storage_path=str((output / "ray").resolve())),
    )
    trainer.fit()
    return json.loads((output / "worker0_summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """Trains, writes OUT/embedder.safetensors and OUT/summary.json, prints the embedder spec."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from(args)
        paths, labels = list_labelled_images(args.data)
        args.output.mkdir(parents=True, exist_ok=True)
        write_json_atomically({"config": dataclasses.asdict(config), "data": str(args.data.resolve()),
                               "images": len(paths), "classes": len(set(labels))}, args.output / "config.json")
        logger.info("%d images in %d classes; %d steps of %d images", len(paths), len(set(labels)), config.steps,
                    config.batch_size)
        if args.ray:
            summary = run_on_ray(config, paths, labels, args.output, args.num_workers, args.use_gpu,
                                 args.checkpoint_every)
        else:
            runtime = select_runtime(args.device)

            def log(metrics: dict) -> None:
                logger.info("step %d  loss %.4f  active %.2f  %.1f images/s", metrics["step"], metrics["loss"],
                            metrics["active"], metrics["images_per_s"])

            summary = train(config, paths, labels, args.output, runtime.device, autocast_dtype=runtime.autocast_dtype,
                            report=log, checkpoint_every=args.checkpoint_every)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary["workers"] = args.num_workers if args.ray else 1
    write_json_atomically(summary, args.output / "summary.json")
    each = " per worker" if summary["workers"] > 1 else ""  # the figures are rank 0's
    print(f"\ntrained {summary['steps']} steps ({summary['steps_this_run']} this run, "
          f"{summary['images_this_run']} images{each} in {summary['seconds']} s, {summary['images_per_s']} "
          f"images/s{each}); loss {summary['first_loss']} -> {summary['last_loss']}")
    if summary["averaged_steps"]:
        first, last = summary["averaged_steps"]
        print(f"weights averaged over steps {first}-{last} ({last - first + 1} steps)")
    print(f"embedder spec: {summary['embedder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
