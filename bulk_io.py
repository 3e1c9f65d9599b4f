"""What the bulk command reads and writes: collections of images in, rows of captions out, safe to resume.

Inputs, in a stable order (items are enumerated lazily, so a collection of any size costs no memory up front):
- a folder, recursively, files taken by their bytes whatever their extension; hidden files and folders are
  skipped, and so are the outputs (the output file, and sidecar `x.txt` / `x.tags.txt` files beside an `x.*`);
- `@list.txt`: a text file listing paths, one per line (relative to the list's folder);
- a WebDataset `.tar` shard: one image per sample (the member with an image extension), the sample key as id;
- a Parquet file with an image-bytes column (the Hugging Face datasets layout, a struct `image.bytes` /
  `image.path`, or a plain binary column; `image_column` chooses).

Outputs (JSONL, Parquet, sidecar text files) are written in whole rows and batches, so that a run killed at any
moment leaves a file the next run repairs and continues: see `open_output`.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet", "sidecar")
# WebDataset fields that hold an image (its members are named <key>.<field>).
IMAGE_FIELDS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "heic", "heif",
                          "avif", "img", "image"})
_local = threading.local()  # per-thread open archives: reading members from many threads at once


@dataclass(frozen=True)
class Item:
    """One image of a collection: its id in the output, and where its bytes are."""

    id: str
    kind: str  # "file", "tar", "parquet", "missing" (a WebDataset sample without an image)
    path: str
    member: str = ""  # tar: the member name; parquet: the column
    row_group: int = 0
    row: int = 0

    def read(self) -> bytes:
        """The image's bytes (OSError when they cannot be read)."""
        if self.kind == "file":
            return Path(self.path).read_bytes()
        if self.kind == "tar":
            archive = _open_tar(self.path)
            member = archive.extractfile(self.member)
            if member is None:
                raise OSError(f"{self.member} is not a regular file in {self.path}")
            return member.read()
        if self.kind == "parquet":
            return _parquet_bytes(self)
        raise OSError(f"sample {self.id} of {self.path} has no image member")

    @property
    def sidecar_base(self) -> Path | None:
        """For a file: its path without the extension (sidecars are `<base>.txt`, `<base>.tags.txt`); a file that
        is itself named `.txt` keeps its whole name, so that its sidecar is never the file itself."""
        if self.kind != "file":
            return None
        path = Path(self.path)
        return path if path.suffix.lower() == ".txt" else path.with_suffix("")


def iter_items(inputs: Sequence[str], *, image_column: str | None = None,
               exclude: Sequence[Path] = ()) -> Iterator[Item]:
    """The items of all inputs, in order. Ids are relative to their input; with several inputs they start
    with the input's own name, so that they stay unique."""
    excluded = {Path(p).resolve() for p in exclude}
    for spec in inputs:
        prefix = "" if len(inputs) == 1 else Path(spec.lstrip("@")).name + "/"
        for item in _items_of(spec, image_column, excluded):
            yield item if not prefix else Item(prefix + item.id, item.kind, item.path, item.member,
                                               item.row_group, item.row)


def _items_of(spec: str, image_column: str | None, excluded: set[Path]) -> Iterator[Item]:
    if spec.startswith("@"):
        yield from _listed(Path(spec[1:]))
        return
    path = Path(spec)
    if path.is_dir():
        yield from _folder(path, path, excluded)
    elif path.suffix == ".tar" and path.is_file():
        yield from _webdataset(path)
    elif path.suffix == ".parquet" and path.is_file():
        yield from _parquet(path, image_column)
    elif path.is_file():
        yield Item(path.name, "file", str(path))
    else:
        raise ConfigError(f"input {spec}: no such file or folder (inputs are folders, @lists, .tar or .parquet)")


def _folder(root: Path, folder: Path, excluded: set[Path]) -> Iterator[Item]:
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        log.warning("Cannot list %s: %s", folder, exc)
        return
    stems = {Path(entry.name).stem for entry in entries if not entry.name.endswith(".txt")}
    for entry in entries:
        if entry.name.startswith("."):
            continue  # hidden files and folders (and our own .partial / .parts files)
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from _folder(root, path, excluded)
        elif entry.is_file() and path.resolve() not in excluded and not _is_sidecar(entry.name, stems):
            yield Item(path.relative_to(root).as_posix(), "file", entry.path)


def _is_sidecar(name: str, stems: set[str]) -> bool:
    """`x.txt` or `x.tags.txt` beside an `x.<ext>` file: a sidecar written by this command, not an input."""
    for suffix in (".tags.txt", ".txt"):
        if name.endswith(suffix) and name[: -len(suffix)] in stems:
            return True
    return False


def _listed(listing: Path) -> Iterator[Item]:
    if not listing.is_file():
        raise ConfigError(f"input @{listing}: no such list file")
    for line in listing.read_text().splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(entry) if Path(entry).is_absolute() else listing.parent / entry
            yield Item(entry, "file", str(path))


def _webdataset(path: Path) -> Iterator[Item]:
    samples: dict[str, list[str]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            key, _, field = base.partition(".")
            samples.setdefault(f"{folder}/{key}" if folder else key, []).append(member.name)
    for key, members in samples.items():
        image = [m for m in members if m.rpartition("/")[2].partition(".")[2].lower() in IMAGE_FIELDS]
        yield Item(key, "tar", str(path), image[0]) if image else Item(key, "missing", str(path))


def _parquet(path: Path, image_column: str | None) -> Iterator[Item]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    column = image_column or _image_column(schema)
    if column not in schema.names:
        raise ConfigError(f"input {path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                          f"choose the image column with --image-column")
    id_columns = [c for c in ("__key__", "id") if c in schema.names]
    seen: set[str] = set()
    for group in range(parquet.num_row_groups):
        names = _row_names(parquet, group, column, id_columns)
        for row, name in enumerate(names):
            item_id = name if name and name not in seen else f"{path.stem}/{group}/{row}"
            seen.add(item_id)
            yield Item(item_id, "parquet", str(path), column, group, row)


def _image_column(schema: Any) -> str:
    import pyarrow as pa

    if "image" in schema.names:
        return "image"
    for field in schema:
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            return field.name
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return field.name
    raise ConfigError(f"no image column found (columns: {', '.join(schema.names)}); use --image-column")


def _row_names(parquet: Any, group: int, column: str, id_columns: list[str]) -> list[str | None]:
    """The id of each row of a row group: its __key__ / id column, else its image.path (no image bytes read)."""
    import pyarrow as pa

    if id_columns:
        return [str(v) if v is not None else None
                for v in parquet.read_row_group(group, columns=id_columns[:1]).column(0).to_pylist()]
    field = parquet.schema_arrow.field(column)
    if pa.types.is_struct(field.type) and field.type.get_field_index("path") >= 0:
        return parquet.read_row_group(group, columns=[f"{column}.path"]).column(0).combine_chunks() \
            .field("path").to_pylist()
    return [None] * parquet.metadata.row_group(group).num_rows


def _open_tar(path: str) -> tarfile.TarFile:
    archives = _local.__dict__.setdefault("tars", {})
    if path not in archives:
        archives[path] = tarfile.open(path)
    return archives[path]


def _parquet_bytes(item: Item) -> bytes:
    """A row's image bytes; the row group's column is read once per thread and reused for its other rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cached = getattr(_local, "parquet", None)
    if cached is None or cached[0] != (item.path, item.row_group, item.member):
        table = pq.ParquetFile(item.path).read_row_group(item.row_group, columns=[item.member])
        _local.parquet = cached = ((item.path, item.row_group, item.member), table.column(0).combine_chunks())
    value = cached[1][item.row]
    if pa.types.is_struct(value.type):
        data, relative = value["bytes"].as_py(), value["path"].as_py() if "path" in value.type.names else None
        if data is None and relative:  # the datasets layout may point at a file instead of holding it
            return (Path(item.path).parent / relative).read_bytes()
        if data is None:
            raise OSError(f"row {item.row} of {item.path} holds no image bytes")
        return data
    data = value.as_py()
    if data is None:
        raise OSError(f"row {item.row} of {item.path} holds no image bytes")
    return data


# ----- outputs --------------------------------------------------------------------------------------------------
def row_of(item_id: str, sha256: str | None, result: dict[str, Any]) -> dict[str, Any]:
    """An output row from a caption result (`caption`, `tags`, `cached`) or an error result (`error`)."""
    if "error" in result:
        return {"id": item_id, "sha256": sha256, "error": result["error"], "cached": False}
    return {"id": item_id, "sha256": sha256, "caption": result["caption"], "tags": result["tags"],
            "cached": result["cached"]}


class Output:
    """Where rows go. `done_ids()` are the ids a previous run finished, in order (repairing what it left);
    `write(rows)` writes one batch of rows in order; `close()` finishes the file."""

    def done_ids(self) -> Iterator[str]:
        return iter(())

    def skip(self, item: Item) -> bool:
        """Whether an item is already done in a way that is not positional (sidecars)."""
        return False

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlOutput(Output):
    """One JSON object per line, flushed per batch; a torn last line (a killed run) is cut off on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._file = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as file:
            data = file.read()
            end = data.rfind(b"\n") + 1
            good = end
            for line in reversed(data[:end].splitlines(keepends=True)):  # the last complete line must parse
                try:
                    json.loads(line)
                    break
                except ValueError:
                    good -= len(line)
            if good != len(data):
                log.warning("%s: cutting off %d bytes of a torn last row left by an interrupted run", self.path,
                            len(data) - good)
                file.truncate(good)

    def done_ids(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as file:
            for line in file:
                yield json.loads(line)["id"]

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class ParquetOutput(Output):
    """Parquet written as the run goes: each batch is a complete part file (`.<name>.parts/`, renamed into
    place once written, so a killed run leaves only whole parts); `close()` merges them, one row group per
    part, into the output file and removes them. A resumed run reads the parts (or the merged file) back."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.path = path
        self.parts = path.parent / f".{path.name}.parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        for stale in self.parts.glob("*.tmp"):
            stale.unlink()
        self.schema = pa.schema([("id", pa.string()), ("sha256", pa.string()), ("caption", pa.string()),
                                 ("tags", pa.list_(pa.string())), ("cached", pa.bool_()),
                                 ("error", pa.struct([("code", pa.string()), ("message", pa.string())]))])
        if path.exists() and not any(self.parts.glob("part-*.parquet")):
            # A finished file, resumed (more inputs, or a run that was merged): its rows become the first part.
            os.replace(path, self.parts / "part-000000.parquet")
        self._count = len(list(self.parts.glob("part-*.parquet")))

    def _part_paths(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def done_ids(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        for part in self._part_paths():
            yield from pq.read_table(part, columns=["id"]).column(0).to_pylist()

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{**{"caption": None, "tags": None, "error": None}, **row} for row in rows],
                                     schema=self.schema)
        final = self.parts / f"part-{self._count:06d}.parquet"
        temporary = final.with_suffix(".tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, final)
        self._count += 1

    def close(self) -> None:
        import pyarrow.parquet as pq

        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with pq.ParquetWriter(temporary, self.schema) as writer:
            for part in self._part_paths():
                writer.write_table(pq.read_table(part))
        os.replace(temporary, self.path)
        for part in self._part_paths():
            part.unlink()
        self.parts.rmdir()


class SidecarOutput(Output):
    """`x.txt` (the caption) and `x.tags.txt` (the tags, comma-separated, one line) next to each image, or under
    `root` mirroring the input's folders. Existing sidecars are kept (the image is skipped) unless `overwrite`.
    Files are written to a temporary name and renamed, so none is ever half written."""

    def __init__(self, root: Path | None, inputs: Sequence[str], overwrite: bool) -> None:
        self.root, self.overwrite = root, overwrite
        self.inputs = [Path(spec) for spec in inputs if not spec.startswith("@") and Path(spec).is_dir()]

    def _base(self, item: Item) -> Path | None:
        base = item.sidecar_base
        if base is None or self.root is None:
            return base
        mirrored = Path(item.id)
        return self.root / (mirrored if mirrored.suffix.lower() == ".txt" else mirrored.with_suffix(""))

    def skip(self, item: Item) -> bool:
        base = self._base(item)
        return not self.overwrite and base is not None and base.with_name(base.name + ".txt").exists()

    def write(self, rows: list[dict[str, Any]]) -> None:
        pass  # done per row by write_row: the bulk runner calls it with the item

    def write_row(self, item: Item, row: dict[str, Any]) -> bool:
        """Write one image's sidecars; False when there is nothing to write (an error, or no file path)."""
        base = self._base(item)
        if base is None or "error" in row:
            return False
        base.parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".txt", row["caption"]), (".tags.txt", ", ".join(row["tags"]))):
            final = base.with_name(base.name + suffix)
            temporary = final.with_name(f".{final.name}.tmp")
            temporary.write_text(text + "\n", encoding="utf-8")
            os.replace(temporary, final)
        return True


def output_format(output: str, requested: str | None) -> str:
    """The output format: --format, else from the output's suffix (a folder means sidecar), else jsonl."""
    if requested:
        return requested
    suffix = Path(output).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(
        suffix, "sidecar" if (Path(output).is_dir() or not suffix) else "jsonl")
