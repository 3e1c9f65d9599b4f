"""The bulk command on Ray Data (`python bulk.py ... --ray [ADDRESS]`): the same job, spread over a cluster.

    items (driver) -> read + cache lookup + decode + preprocess (Ray tasks, CPU, any node)
                   -> caption (an actor pool: one loaded captioner per actor, --workers N or MIN:MAX, GPUs each)
                   -> rows back to the driver, in input order -> the same writers as one machine

Both stages are CaptionService halves (lookup_and_prepare without the model in the tasks; submit_prepared in
the actors), so captions, tags, error codes and cache keys are those of the server and of a local run. The
rows come back to the driver in input order and are written there by the same writers as a local run: one
merged output, resumable the same way. Ray retries the blocks of a failed actor (its actors restart and
its tasks are retried); rows are written by their input index, once each.

This module is imported only by `bulk.py --ray`: neither the server nor a local bulk run imports Ray.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import allocator
from bulk import read_items
from bulk_io import Item, row_of
from captioners.base import default_batch_size
from errors import ConfigError, ServiceError
from service import Answer, CaptionService

if TYPE_CHECKING:
    from bulk import Counts
    from bulk_io import Output
    from config import Config

log = logging.getLogger("bulk")

PREPARE_CPUS = 0.25  # a read/preprocess task is short and mostly waits for I/O or the image library
ACTOR_CPUS = 0.5  # torch in the actor uses the cores it finds; this is Ray's bookkeeping, so tasks still fit


def parse_workers(text: str) -> int | tuple[int, int]:
    """--workers N (a fixed pool) or MIN:MAX (Ray Data autoscales the pool between them)."""
    try:
        low, _, high = text.partition(":")
        workers = (int(low), int(high)) if high else int(low)
    except ValueError:
        raise ConfigError(f"--workers {text!r}: give N or MIN:MAX") from None
    if min(workers if isinstance(workers, tuple) else (workers,)) < 1:
        raise ConfigError(f"--workers {text!r}: at least 1 worker")
    return workers


def run_ray(config: "Config", args: argparse.Namespace, output: "Output", counts: "Counts") -> None:
    """Caption the items not done yet on Ray Data, writing the rows in input order as they come back."""
    import ray

    from bulk import Progress, Total, _outputs, _resume
    from bulk_io import SidecarOutput, iter_items

    workers = parse_workers(args.workers)
    ray.init(address=None if args.ray == "local" else args.ray, logging_level="WARNING", log_to_driver=False,
             runtime_env=_runtime_env(args.ray))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order
    context.enable_progress_bars = False  # ours (on the driver) says the same, in the same words as a local run
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    items = _resume(iter_items(args.inputs, image_column=args.image_column, exclude=_outputs(args)), output, counts)
    todo: list[Item] = []
    for item in items:
        if output.skip(item):
            counts.skipped += 1
        else:
            todo.append(item)
    progress = Progress(counts, Total(iter_items(args.inputs, image_column=args.image_column,
                                                 exclude=_outputs(args))))
    if todo:
        dataset = ray.data.from_items([{"index": i, "item": json.dumps(dataclasses.asdict(item))}
                                       for i, item in enumerate(todo)])
        batch = config.max_batch_size or default_batch_size("cuda" if args.gpus_per_worker else "cpu")
        # Distinct resources keep the two stages apart (Ray would otherwise fuse the tasks into the actors):
        # reading and preprocessing scale on any CPU of the cluster, the actors hold the model.
        prepared = dataset.map_batches(prepare_batch, batch_size=batch, fn_kwargs={"config": config},
                                       num_cpus=PREPARE_CPUS)
        pool = ray.data.ActorPoolStrategy(size=workers) if isinstance(workers, int) else \
            ray.data.ActorPoolStrategy(min_size=workers[0], max_size=workers[1])
        # An actor that dies (a killed process, a lost node) is restarted and its batches retried.
        captioned = prepared.map_batches(CaptionActor, batch_size=batch, fn_constructor_kwargs={"config": config},
                                         compute=pool, num_cpus=ACTOR_CPUS, num_gpus=args.gpus_per_worker or None,
                                         max_restarts=-1, max_task_retries=-1)
        written = 0
        for block in captioned.iter_batches(batch_size=batch, batch_format="pandas"):
            rows = [json.loads(text) for index, text in zip(block["index"], block["row"]) if index >= written]
            indexes = [index for index in block["index"] if index >= written]
            if indexes != list(range(written, written + len(indexes))):
                raise RuntimeError(f"rows came back out of order at {written}: {indexes[:5]}")
            if isinstance(output, SidecarOutput):
                for row, index in zip(rows, indexes):
                    output.write_row(todo[index], row)
            else:
                output.write(rows)
            written += len(rows)
            for row in rows:
                counts.add(row)
            progress.update(len(rows))
    progress.close()
    ray.shutdown()


def _runtime_env(address: str) -> dict[str, Any]:
    """The workers import this project: from this checkout on this machine's cluster, uploaded to a remote one
    (its environment must have the requirements installed, e.g. the same image)."""
    root = Path(__file__).resolve().parent
    memory = allocator.preload_env()  # the driver's jemalloc for the workers too (the model thread's arena)
    if address.startswith("ray://"):
        return {"working_dir": str(root), "excludes": [".git", ".venv", ".cache", "bench/models", "tests/artifacts"],
                **({"env_vars": memory} if memory else {})}
    return {"env_vars": {"PYTHONPATH": str(root), **memory}}


@functools.cache
def _preparer(config: "Config") -> CaptionService:
    """A service without the model weights, once per Ray worker process: enough to look up and prepare."""
    service = CaptionService(config)
    service.start(model=False)
    return service


def prepare_batch(batch: dict[str, Any], config: "Config") -> dict[str, Any]:
    """Ray task: read each item, look it up in the cache, decode and preprocess the misses.

    Out: index, id, the finished row (cached or refused files) as JSON or "", the cache key and the pickled
    model inputs of the files still to caption.
    """
    service = _preparer(config)
    items = [Item(**json.loads(text)) for text in batch["item"]]
    uploads, unread = read_items(items)
    answer = Answer(uploads, unread)
    inputs, _ = service.lookup_and_prepare(answer, service.ask())
    out: dict[str, list[Any]] = {"index": list(batch["index"]), "id": [], "sha256": [], "row": [], "key": [],
                                 "inputs": []}
    for position, item in enumerate(items):
        key, digest = answer.keys[position], answer.digests[position]
        todo = key is not None and key in inputs
        out["id"].append(item.id)
        out["sha256"].append(digest)
        out["row"].append("" if todo else json.dumps(row_of(item.id, digest, answer.results[position])))
        out["key"].append(key if todo else "")
        out["inputs"].append(pickle.dumps({name: value.numpy() for name, value in inputs[key].items()})
                             if todo else b"")
    return out


class CaptionActor:
    """Ray actor: one loaded captioner (a started CaptionService), captioning the prepared batches it gets."""

    def __init__(self, config: "Config") -> None:
        self.service = CaptionService(config)
        self.service.start()
        self.prompt = self.service.ask()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        todo = {key: {name: torch.from_numpy(value) for name, value in pickle.loads(blob).items()}
                for key, blob in zip(batch["key"], batch["inputs"]) if key}
        results = self.service.submit_prepared(todo, self.prompt).results() if todo else {}
        rows = []
        for item_id, digest, row, key in zip(batch["id"], batch["sha256"], batch["row"], batch["key"]):
            if not key:
                rows.append(row)
                continue
            result = results[key]
            if isinstance(result, ServiceError):
                rows.append(json.dumps(row_of(item_id, digest, {"error": result.to_dict()})))
            else:
                value, cached = result
                rows.append(json.dumps(row_of(item_id, digest, {**value, "cached": cached})))
        return {"index": list(batch["index"]), "row": rows}
