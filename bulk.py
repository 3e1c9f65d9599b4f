"""Caption a whole collection: folders, path lists, WebDataset shards and Parquet files, to JSONL, Parquet or
sidecar text files, with the server's model code, decoding, tagger and cache.

    python bulk.py INPUT... --output OUT [--format jsonl|parquet|sidecar] [model flags as for app.py]
    python bulk.py photos/ --output captions.jsonl --blip2 --caption-prompt "Question: ... Answer:"
    python bulk.py shards/*.tar --output out.parquet --ray auto --workers 4 --gpus-per-worker 1

The run goes through the same CaptionService as the server (so the same cache keys: with Redis configured,
images captioned here are cache hits for the server and the other way round), fed by a few reader threads
that read, decode and preprocess ahead of the model. It is resumable: run the same command again and it goes
on where it stopped (bulk_io.py says how each output stays whole). Bad files are rows with an error code; the
exit code is 0 when the run finished, 1 when it could not go on, 2 for a usage or configuration error.
`--ray` runs the same job as a Ray Data pipeline (bulk_ray.py); without it Ray is never imported.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import allocator
import logs
from bulk_io import FORMATS, Item, JsonlOutput, Output, ParquetOutput, SidecarOutput, iter_items, output_format, row_of
from config import Config, build_parser, config_from_args
from errors import ConfigError, ModelLoadError, UnreadableFileError
from service import CaptionService, Upload

log = logging.getLogger("bulk")

READERS = 3  # batches being read, decoded and preprocessed while the model runs one
PROGRESS_LOG_SECONDS = 10.0  # how often the plain progress line is logged when stderr is not a terminal


def build_bulk_parser() -> argparse.ArgumentParser:
    """app.py's flags and settings, plus what a bulk run needs."""
    parser = build_parser(prog="python bulk.py", description=__doc__.split("\n\n")[0].replace("\n", " ")
                          + " Model flags and settings are those of app.py (flags > environment > .env).")
    bulk = parser.add_argument_group("bulk")
    bulk.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="folders (recursive), @list.txt files, WebDataset .tar shards, Parquet files")
    bulk.add_argument("--output", help="output file (.jsonl, .parquet) or, for sidecars, a folder to mirror the "
                                       "inputs under (default for sidecars: next to each image)")
    bulk.add_argument("--format", choices=FORMATS, help="default: from the output's suffix (jsonl)")
    bulk.add_argument("--image-column", help="Parquet: the column with the image bytes (default: image)")
    bulk.add_argument("--overwrite", action="store_true", help="sidecars: replace existing x.txt files")
    bulk.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    bulk.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                      help="run on Ray Data: a local Ray for the run, or a cluster (auto, ray://host:10001)")
    bulk.add_argument("--workers", default="1", help="Ray: captioning actors, N or MIN:MAX to autoscale")
    bulk.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray: GPUs per captioning actor")
    return parser


@dataclass
class Counts:
    """What a run did, for the progress bar and the summary line."""

    captioned: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    failed_codes: dict[str, int] = field(default_factory=dict)
    model_ready: float | None = None  # time.monotonic() when the model was loaded (a local run)

    def add(self, row: dict[str, Any]) -> None:
        if "error" in row:
            self.failed += 1
            code = row["error"]["code"]
            self.failed_codes[code] = self.failed_codes.get(code, 0) + 1
        elif row["cached"]:
            self.cached += 1
        else:
            self.captioned += 1

    @property
    def done(self) -> int:
        return self.captioned + self.cached + self.failed

    def line(self, codes: bool = True) -> str:
        """`captioned N, cached N, failed N (code N, ...), skipped N` (the codes left out for the bar)."""
        codes = ", ".join(f"{code} {n}" for code, n in sorted(self.failed_codes.items())) if codes else ""
        return (f"captioned {self.captioned}, cached {self.cached}, failed {self.failed}"
                f"{f' ({codes})' if codes else ''}, skipped {self.skipped}")


class Progress:
    """A tqdm bar on a terminal (images/s, ETA, the counts); plain log lines every few seconds otherwise."""

    def __init__(self, counts: Counts, total: "Total") -> None:
        from tqdm import tqdm

        self.counts, self.total = counts, total
        self.bar = None
        if sys.stderr.isatty():
            # A terminal that reports no size (a bare pty, some CI consoles) makes tqdm draw nothing at all.
            size = os.get_terminal_size(sys.stderr.fileno())
            self.bar = tqdm(total=None, unit="img", file=sys.stderr, smoothing=0.1,
                            dynamic_ncols=size.columns > 0, ncols=None if size.columns > 0 else 120,
                            nrows=None if size.lines > 0 else 24)
        self._last_log = time.monotonic()
        self._started = time.monotonic()
        self._skipped = 0

    def update(self, images: int) -> None:
        """`images` more were answered (the skipped ones are taken from the counts)."""
        skipped, self._skipped = self.counts.skipped - self._skipped, self.counts.skipped
        if self.bar is not None:
            if self.total.value is not None and self.bar.total is None:
                self.bar.total = self.total.value
            self.bar.set_postfix_str(self.counts.line(codes=False), refresh=False)
            self.bar.update(images + skipped)
        elif time.monotonic() - self._last_log >= PROGRESS_LOG_SECONDS:
            self._last_log = time.monotonic()
            rate = self.counts.done / max(time.monotonic() - self._started, 1e-9)
            of = f" of {self.total.value}" if self.total.value is not None else ""
            log.info("%d%s images, %.2f img/s: %s", self.counts.done + self.counts.skipped, of, rate,
                     self.counts.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Total:
    """The collection's size, counted in a background thread (listing a big collection takes a while; the
    run does not wait for it)."""

    def __init__(self, items: Iterator[Item]) -> None:
        self.value: int | None = None
        threading.Thread(target=self._count, args=(items,), daemon=True, name="count").start()

    def _count(self, items: Iterator[Item]) -> None:
        try:
            self.value = sum(1 for _ in items)
        except Exception:  # noqa: BLE001 - the main enumeration reports the same problem
            pass


def run_local(config: Config, args: argparse.Namespace, output: Output, counts: Counts) -> None:
    """Caption every item not done yet, in order, writing whole batches; the model never waits for reading."""
    service = CaptionService(config)
    service.start()
    counts.model_ready = time.monotonic()
    try:
        items = _resume(iter_items(args.inputs, image_column=args.image_column, exclude=_outputs(args)),
                        output, counts)
        progress = Progress(counts, Total(iter_items(args.inputs, image_column=args.image_column,
                                                     exclude=_outputs(args))))
        batch_size = service.batch_size
        window: deque[tuple[list[Item], Future]] = deque()
        with ThreadPoolExecutor(READERS, thread_name_prefix="reader") as readers:
            for batch in _batches(items, batch_size, output, counts):
                window.append((batch, readers.submit(_caption_batch, service, batch)))
                if len(window) >= READERS:
                    _write(*window.popleft(), output, counts, progress)
            while window:
                _write(*window.popleft(), output, counts, progress)
        progress.close()
    finally:
        service.stop()


def _resume(items: Iterator[Item], output: Output, counts: Counts) -> Iterator[Item]:
    """Skip the items a previous run wrote (they are the first rows, in order); refuse if they differ."""
    for done_id in output.done_ids():
        item = next(items, None)
        if item is None or item.id != done_id:
            raise ConfigError(f"the output already holds rows for other inputs (row {counts.skipped + 1} is "
                              f"{done_id!r}, the inputs give {item.id if item else 'nothing more'!r}); resume with "
                              f"the same inputs, or write to a new output")
        counts.skipped += 1
    return items


def _batches(items: Iterator[Item], size: int, output: Output, counts: Counts) -> Iterator[list[Item]]:
    """Batches of items still to caption (items an output already has, such as sidecars, are skipped)."""
    def todo() -> Iterator[Item]:
        for item in items:
            if output.skip(item):
                counts.skipped += 1
            else:
                yield item

    remaining = todo()
    while batch := list(islice(remaining, size)):
        yield batch


def read_items(items: Sequence[Item]) -> tuple[list[Upload], dict[int, UnreadableFileError]]:
    """Each item's bytes as an upload; an item that cannot be read gets an empty one and its error."""
    uploads, unread = [], {}
    for index, item in enumerate(items):
        try:
            uploads.append(Upload(item.id, item.read()))
        except OSError as exc:
            unread[index] = UnreadableFileError(f"{item.id} could not be read: {exc}")
            uploads.append(Upload(item.id, b""))
    return uploads, unread


def _caption_batch(service: CaptionService, batch: list[Item]) -> list[dict[str, Any]]:
    """Read, then caption one batch through the service (decode and preprocess happen in its workers)."""
    uploads, unread = read_items(batch)
    answer = service.caption_uploads(uploads, None, refused=unread)
    return [row_of(item.id, digest, result) for item, digest, result in zip(batch, answer.digests, answer.results)]


def _write(batch: list[Item], future: Future, output: Output, counts: Counts, progress: Progress) -> None:
    rows = future.result()
    if isinstance(output, SidecarOutput):
        for item, row in zip(batch, rows):
            output.write_row(item, row)
            if "error" in row:
                log.warning("%s: %s (%s)", row["id"], row["error"]["message"], row["error"]["code"])
    else:
        output.write(rows)
    for row in rows:
        counts.add(row)
    progress.update(len(rows))


def _outputs(args: argparse.Namespace) -> list[Path]:
    return [Path(args.output)] if args.output else []


def open_output(args: argparse.Namespace) -> Output:
    """The output the arguments ask for (see bulk_io)."""
    kind = output_format(args.output or "", args.format)
    if kind == "sidecar":
        return SidecarOutput(Path(args.output) if args.output else None, args.inputs, args.overwrite)
    if not args.output:
        raise ConfigError(f"--output is needed for --format {kind}")
    return (JsonlOutput if kind == "jsonl" else ParquetOutput)(Path(args.output))


def summary_line(counts: Counts, started: float, finished: float) -> str:
    """`bulk: N images in S s (R img/s[, R img/s after the model loaded in L s]): captioned N, ...`."""
    seconds = finished - started
    rate = f"{counts.done / seconds if seconds else 0.0:.2f} img/s"
    if counts.model_ready is not None and finished > counts.model_ready:
        rate += (f", {counts.done / (finished - counts.model_ready):.2f} img/s after the model loaded in "
                 f"{counts.model_ready - started:.1f} s")
    return f"bulk: {counts.done} images in {seconds:.1f} s ({rate}): {counts.line()}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, caption the collection, print the summary; the exit code."""
    args = build_bulk_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if args.no_cache:
            config = config.replace(cache_backend="off")
        config = config.replace(warmup=False)
        if argv is None:  # run as the program: jemalloc replaces malloc (this may start the command again)
            allocator.preload(config.allocator)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure_logging(config.log_level, config.log_format)
    counts = Counts()
    started = time.monotonic()
    try:
        output = open_output(args)
        if args.ray:
            from bulk_ray import run_ray

            run_ray(config, args, output, counts)
        else:
            run_local(config, args, output, counts)
        output.close()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: the run cannot go on: {exc}", file=sys.stderr)
        return 1
    print(summary_line(counts, started, time.monotonic()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
