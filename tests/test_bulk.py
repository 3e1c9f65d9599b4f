"""The bulk command as a user runs it: `python bulk.py` as a subprocess on a collection of real files, beside a
live server on the same tiny checkpoint and the same Redis; a real local Ray cluster for `--ray`.

What a run must give: one row per image in a stable order, the server's captions, error rows with the API's
codes for bad files, exit 0; resumable after SIGKILL with nothing lost, duplicated or torn; sidecars that never
overwrite a hand-written file; the same captions from WebDataset shards and Parquet; a cache shared with the
server in both directions.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from support.collection import webdataset_key, write_collection, write_parquet, write_webdataset
from support.live import LiveServerTestCase
from support.services import REPO_ROOT, free_port, missing_service
from support.tiny_models import tiny_checkpoint

pytestmark = pytest.mark.live

MODEL = ["--blip", "--model-path"]


def bulk_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "bulk.py"), *MODEL, str(tiny_checkpoint("blip")), *args]


def bulk_env(**settings: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "ENV_FILE": os.devnull, "LOG_FORMAT": "text", "DTYPE": "float32", **settings}


def run_bulk(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the bulk command to its end (stderr not a terminal: plain progress lines)."""
    return subprocess.run(bulk_command(*args), env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def summary(stderr: str) -> dict[str, int]:
    """The counts of the final `bulk: ...` line."""
    lines = [line for line in stderr.splitlines() if line.startswith("bulk: ")]
    assert lines, f"no summary line in:\n{stderr[-3000:]}"
    counts = {}
    for part in lines[-1].split(": ", 2)[2].split(", "):
        words = part.split()
        if words and words[0] in ("captioned", "cached", "failed", "skipped"):
            counts[words[0]] = int(words[1])
    return counts


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # a torn line would raise here


def read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def parquet_rows_written(path: Path) -> int:
    import pyarrow.parquet as pq

    parts = path.parent / f".{path.name}.parts"
    total = 0
    for part in sorted(parts.glob("part-*.parquet")):
        try:
            total += pq.ParquetFile(part).metadata.num_rows
        except Exception:  # noqa: BLE001 - a part renamed in while we read the listing
            pass
    return total


def by_digest(rows: list[dict[str, Any]]) -> dict[str, tuple[str, list[str]]]:
    return {row["sha256"]: (row["caption"], list(row["tags"])) for row in rows if row.get("caption") is not None}


class BulkTestCase(LiveServerTestCase):
    """One collection (200 good images, 10 bad files) and the server's answers for it, shared by the tests."""

    # Short captions keep the many runs quick (random weights never stop early); bulk runs get the same.
    server_env = {"MAX_NEW_TOKENS": "8"}

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.tmp = Path(tempfile.mkdtemp(prefix="bulk-test-"))
        cls.collection = cls.tmp / "photos"
        cls.images, cls.bad = write_collection(cls.collection, 200)
        cls.server_answers = cls._server_captions(cls.images)
        # The reference: one uninterrupted run with the cache off (the model captions every image).
        cls.reference_path = cls.tmp / "reference.jsonl"
        cls.reference_run = run_bulk(str(cls.collection), "--output", str(cls.reference_path), "--no-cache",
                                     env=cls.env())
        cls.reference = read_jsonl(cls.reference_path) if cls.reference_path.exists() else []

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    @classmethod
    def env(cls, **settings: str) -> dict[str, str]:
        """The server's settings: its Redis, its key prefix."""
        return bulk_env(REDIS_URL=cls.redis.url, CACHE_PREFIX=cls.prefix, **cls.server_env, **settings)

    @classmethod
    def _server_captions(cls, images: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """What the server answers for each image (posted 16 at a time), by id."""
        answers, names = {}, sorted(images)
        for start in range(0, len(names), 16):
            chunk = names[start:start + 16]
            response = cls.server.post_images([(Path(name).name, images[name]) for name in chunk])
            assert response.status_code == 200, response.text
            answers.update(zip(chunk, response.json()["results"]))
        return answers

    def assert_complete(self, rows: list[dict[str, Any]]) -> None:
        """210 rows, each id once, in the reference's order, with its captions and error codes."""
        self.assertEqual([row["id"] for row in rows], [row["id"] for row in self.reference])
        self.assertEqual(len({row["id"] for row in rows}), 210)
        for row, expected in zip(rows, self.reference):
            self.assertEqual((row.get("caption"), row.get("tags") and list(row["tags"]), row.get("error")),
                             (expected.get("caption"), expected.get("tags"), expected.get("error")), row["id"])


class FolderToJsonl:
    """A folder of 200 images and 10 bad files: 210 rows, the server's captions, error codes, exit 0."""

    def test_reference_run_has_every_file_with_the_servers_captions(self) -> None:
        run = self.reference_run
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        rows = self.reference
        self.assertEqual(len(rows), 210)
        self.assertEqual(sorted(row["id"] for row in rows), sorted([*self.images, *self.bad]))
        self.assertEqual([row["id"] for row in rows], sorted(row["id"] for row in rows), "a stable, sorted order")
        for row in rows:
            if row["id"] in self.bad:
                self.assertEqual(row["error"]["code"], self.bad[row["id"]], row)
                self.assertNotIn("caption", row)
            else:
                server = self.server_answers[row["id"]]
                self.assertEqual((row["caption"], row["tags"]), (server["caption"], server["tags"]), row["id"])
                self.assertFalse(row["cached"])  # --no-cache: the model ran for each
        self.assertEqual(summary(run.stderr), {"captioned": 200, "cached": 0, "failed": 10, "skipped": 0})
        self.assertNotIn("Traceback", run.stderr)

    def test_ids_are_paths_and_the_hidden_files_are_not_inputs(self) -> None:
        ids = {row["id"] for row in self.reference}
        self.assertIn("set1/part1/img0001.jpg", ids)
        self.assertFalse([i for i in ids if "/." in i or i.startswith(".")], "hidden files are skipped")
        self.assertNotIn("reference.jsonl", ids)

    def test_a_terminal_gets_a_progress_bar_and_the_summary(self) -> None:
        output = self.tmp / "tty.jsonl"
        primary, secondary = pty.openpty()
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 140, 0, 0))  # a 140-column terminal
        process = subprocess.Popen(bulk_command(str(self.collection), "--output", str(output)), env=self.env(),
                                   cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=secondary)
        os.close(secondary)
        seen = b""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:
                    break  # the child closed the terminal
                if not chunk:
                    break
                seen += chunk
            elif process.poll() is not None:
                break
        os.close(primary)
        self.assertEqual(process.wait(30), 0, seen[-3000:])
        text = seen.decode(errors="replace")
        self.assertIn("img/s", text)  # tqdm's rate
        self.assertIn("210/210", text)  # and its count against the total
        self.assertRegex(text, r"captioned \d+, cached \d+, failed 10")
        self.assertIn("\r", text)  # a bar redrawn in place, not log lines
        self.assertIn("bulk: 210 images", text)
        self.assertEqual(len(read_jsonl(output)), 210)

    def test_not_a_terminal_gets_log_lines_and_the_summary(self) -> None:
        self.assertNotIn("\r", self.reference_run.stderr)
        self.assertRegex(self.reference_run.stderr, r"bulk: 210 images in [\d.]+ s \([\d.]+ img/s[^)]*\): captioned 200")


class KilledAndResumed:
    """SIGKILL halfway, then the same command again: the rows of one uninterrupted run."""

    def kill_halfway(self, output: Path, count_rows: Any, *extra: str) -> int:
        """Start a run (small batches, cache off), SIGKILL it once a third of the rows are written."""
        process = subprocess.Popen(bulk_command(str(self.collection), "--output", str(output), "--no-cache",
                                                "--max-batch-size", "2", *extra),
                                   env=self.env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if count_rows() >= 70:
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            process.kill()
            stderr = process.communicate(timeout=30)[1].decode(errors="replace")
        self.assertEqual(process.returncode, -signal.SIGKILL, f"the run ended before it was killed:\n{stderr}")
        written = count_rows()
        self.assertLess(written, 210, "killed too late to show a resume")
        return written

    def test_jsonl(self) -> None:
        output = self.tmp / "killed.jsonl"
        self.kill_halfway(output, lambda: output.read_bytes().count(b"\n") if output.exists() else 0)
        with open(output, "ab") as file:
            file.write(b'{"id": "set0/part0/img0000.png", "sha256": "ab')  # as if killed in the middle of a row
        done = len(read_jsonl_lenient(output))
        run = run_bulk(str(self.collection), "--output", str(output), "--no-cache", env=self.env())
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        self.assertIn("torn last row", run.stderr)
        self.assertEqual(summary(run.stderr)["skipped"], done)
        self.assertEqual(sum(summary(run.stderr).values()), 210)
        self.assert_complete(read_jsonl(output))

    def test_parquet(self) -> None:
        output = self.tmp / "killed.parquet"
        self.kill_halfway(output, lambda: parquet_rows_written(output), "--format", "parquet")
        parts = output.parent / f".{output.name}.parts"
        (parts / "part-999999.tmp").write_bytes(b"PAR1 half a part file")  # as if killed while writing one
        done = parquet_rows_written(output)
        run = run_bulk(str(self.collection), "--output", str(output), "--no-cache", env=self.env())
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        self.assertEqual(summary(run.stderr)["skipped"], done)
        self.assertFalse(parts.exists(), "the parts are merged into the output and removed")
        self.assert_complete(read_parquet(output))

    def test_other_inputs_into_the_same_output_are_refused(self) -> None:
        output = self.tmp / "mixed.jsonl"
        output.write_text(json.dumps({"id": "something/else.png", "sha256": "0" * 64, "caption": "x", "tags": [],
                                      "cached": False}) + "\n")
        run = run_bulk(str(self.collection), "--output", str(output), env=self.env())
        self.assertEqual(run.returncode, 2, run.stderr[-2000:])
        self.assertIn("other inputs", run.stderr)
        self.assertEqual(output.read_text().count("\n"), 1, "the output is left as it was")


def read_jsonl_lenient(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a file whose last line may be torn."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


class Sidecars:
    """`x.txt` + `x.tags.txt` beside each good image; a second run skips them; hand-written files survive."""

    def test_sidecars_skip_and_overwrite(self) -> None:
        folder = self.tmp / "sidecars"
        shutil.copytree(self.collection, folder)
        hand = folder / "set2" / "y.png"
        hand.write_bytes(self.images["set1/part1/img0001.jpg"])
        (folder / "set2" / "y.txt").write_text("my own words\n")
        run = run_bulk(str(folder), "--format", "sidecar", env=self.env())
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        self.assertEqual(summary(run.stderr), {"captioned": 0, "cached": 200, "failed": 10, "skipped": 1})
        for relative in self.images:
            base = (folder / relative).with_suffix("")
            self.assertEqual(base.with_name(base.name + ".txt").read_text(),
                             self.server_answers[relative]["caption"] + "\n", relative)
            self.assertEqual(base.with_name(base.name + ".tags.txt").read_text(),
                             ", ".join(self.server_answers[relative]["tags"]) + "\n")
        for relative in self.bad:
            if not relative.endswith(".txt"):
                self.assertFalse((folder / relative).with_suffix(".txt").exists(), "no sidecar for a bad file")
        self.assertEqual((folder / "set2" / "y.txt").read_text(), "my own words\n")
        self.assertFalse((folder / "set2" / "y.tags.txt").exists())

        again = run_bulk(str(folder), "--format", "sidecar", env=self.env())
        self.assertEqual(again.returncode, 0, again.stderr[-3000:])
        self.assertEqual(summary(again.stderr), {"captioned": 0, "cached": 0, "failed": 10, "skipped": 201})

        overwrite = run_bulk(str(folder), "--format", "sidecar", "--overwrite", env=self.env())
        self.assertEqual(overwrite.returncode, 0, overwrite.stderr[-3000:])
        self.assertEqual((folder / "set2" / "y.txt").read_text(),
                         self.server_answers["set1/part1/img0001.jpg"]["caption"] + "\n")

    def test_sidecars_mirrored_under_an_output_folder(self) -> None:
        mirror = self.tmp / "mirror"
        run = run_bulk(str(self.collection), "--format", "sidecar", "--output", str(mirror), env=self.env())
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        relative = "set0/part3/img0003.jpg"  # a PNG named .jpg
        self.assertTrue(relative in self.images, "the collection holds this image")
        self.assertEqual((mirror / "set0/part3/img0003.txt").read_text(),
                         self.server_answers[relative]["caption"] + "\n")
        self.assertFalse((self.collection / "set0/part3/img0003.txt").exists(), "nothing beside the originals")


class Archives:
    """The same images as WebDataset shards and as a Parquet file (Hugging Face layout): the same captions."""

    def test_webdataset_and_parquet(self) -> None:
        shards = write_webdataset(self.images, self.tmp / "shards", shards=2)
        parquet = write_parquet(self.images, self.tmp / "table" / "images.parquet")
        output = self.tmp / "archives.jsonl"
        run = run_bulk(*map(str, shards), str(parquet), "--output", str(output), "--no-cache", env=self.env())
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        rows = read_jsonl(output)
        self.assertEqual(len(rows), 400)
        self.assertEqual(len({row["id"] for row in rows}), 400, "ids are unique across inputs")
        self.assertEqual({row["id"].split("/", 1)[1] for row in rows if row["id"].startswith("shard-")},
                         {webdataset_key(relative) for relative in self.images}, "the sample keys are the ids")
        self.assertIn("images.parquet/set1/part1/img0001.jpg", {row["id"] for row in rows})
        expected = by_digest(self.reference)
        for source in ("shard-", "images.parquet/"):
            got = {row["sha256"]: (row["caption"], row["tags"]) for row in rows if row["id"].startswith(source)}
            self.assertEqual(len(got), 200)
            self.assertEqual(got, {digest: expected[digest] for digest in got})
        self.assertEqual(summary(run.stderr)["captioned"], 400)


class SharedCache:
    """With the server's Redis and prefix, bulk and server read and write the same entries."""

    def test_bulk_results_are_cached_for_the_server(self) -> None:
        folder = self.tmp / "fresh-for-server"
        images, _ = write_collection(folder, 20, start=1000)
        shutil.rmtree(folder / "bad")
        (folder / "set1" / "bomb.jpg").unlink()
        run = run_bulk(str(folder), "--output", str(self.tmp / "fresh.jsonl"), env=self.env())
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        self.assertEqual(summary(run.stderr), {"captioned": 20, "cached": 0, "failed": 0, "skipped": 0})
        rows = {row["id"]: row for row in read_jsonl(self.tmp / "fresh.jsonl")}
        for name in sorted(images):
            result = self.server.post_images([(Path(name).name, images[name])]).json()["results"][0]
            self.assertTrue(result["cached"], name)
            self.assertEqual((result["caption"], result["tags"]), (rows[name]["caption"], rows[name]["tags"]))

    def test_images_the_server_answered_are_not_captioned_again(self) -> None:
        folder = self.tmp / "seen-by-server"
        images, _ = write_collection(folder, 20, start=2000)
        shutil.rmtree(folder / "bad")
        (folder / "set1" / "bomb.jpg").unlink()
        answers = self._server_captions(images)
        self.assertFalse(any(answer["cached"] for answer in answers.values()))
        run = run_bulk(str(folder), "--output", str(self.tmp / "seen.jsonl"), env=self.env())
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        self.assertEqual(summary(run.stderr), {"captioned": 0, "cached": 20, "failed": 0, "skipped": 0})
        for row in read_jsonl(self.tmp / "seen.jsonl"):
            self.assertTrue(row["cached"])
            self.assertEqual(row["caption"], answers[row["id"]]["caption"])

    def test_no_cache_neither_reads_nor_writes(self) -> None:
        folder = self.tmp / "not-cached"
        images, _ = write_collection(folder, 4, start=3000)
        shutil.rmtree(folder / "bad")
        (folder / "set1" / "bomb.jpg").unlink()
        run = run_bulk(str(folder), "--output", str(self.tmp / "nc.jsonl"), "--no-cache", env=self.env())
        self.assertEqual(summary(run.stderr)["captioned"], 4)
        name = sorted(images)[0]
        self.assertFalse(self.server.post_images([(name, images[name])]).json()["results"][0]["cached"])


class RayCluster:
    """`ray start --head --block` of our own (2 CPUs), stopped with its whole process group."""

    def __init__(self) -> None:
        self.binary = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        if not Path(self.binary).exists():
            missing_service("Ray is not installed (pip install -r requirements-ray.txt)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
        self.log = open(Path(self.dir) / "ray-start.log", "wb")
        # Ray 2.59+ authenticates every client of a cluster with a token (on by default for local clusters); ours
        # gets its own, given to the bulk run as an operator would (not the shared ~/.ray/auth_token).
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.process = subprocess.Popen(
            [self.binary, "start", "--head", "--block", f"--port={self.port}", "--num-cpus=2", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.dir}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.client_env})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ray start exited: {(Path(self.dir) / 'ray-start.log').read_text()}")
            if "Ray runtime started" in (Path(self.dir) / "ray-start.log").read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError("the local Ray cluster did not start")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def actor_pids() -> list[int]:
    """The processes of this cluster's captioning actors (Ray names them after the class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"CaptionActor" in title and b"bulk.py" not in title:
                pids.append(int(entry.name))
    return pids


class RayRun:
    """`--ray ADDRESS` on a real local cluster: the rows of the one-machine run, even when an actor dies."""

    def test_ray_same_rows_as_one_machine_with_an_actor_killed(self) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            missing_service("Ray is not installed (pip install -r requirements-ray.txt)")
        cluster = RayCluster()
        try:
            cluster.wait_ready()
            self.run_on_ray(cluster)
        finally:
            cluster.stop()

    def run_on_ray(self, cluster: "RayCluster") -> None:
        output = self.tmp / "ray.jsonl"
        process = subprocess.Popen(bulk_command(str(self.collection), "--output", str(output), "--no-cache",
                                                "--ray", cluster.address, "--workers", "2",
                                                "--max-batch-size", "4"),
                                   env={**self.env(), **cluster.client_env}, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        killed = None
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline and process.poll() is None and killed is None:
                pids = actor_pids()
                if len(pids) == 2 and output.exists() and output.read_bytes().count(b"\n") >= 8:
                    killed = pids[0]
                    os.kill(killed, signal.SIGKILL)
                time.sleep(0.02)
            stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))[1].decode(errors="replace")
        finally:
            process.kill()
        self.assertIsNotNone(killed, f"no moment with two actors and rows written was seen (exit "
                                     f"{process.returncode}, {len(read_jsonl(output)) if output.exists() else 0} rows, "
                                     f"last actors seen {pids}):\n{stderr[-3000:]}")
        self.assertEqual(process.returncode, 0, stderr[-4000:])
        rows = read_jsonl(output)
        self.assert_complete(rows)
        self.assertEqual(summary(stderr), {"captioned": 200, "cached": 0, "failed": 10, "skipped": 0})


class TestBulk(FolderToJsonl, KilledAndResumed, Sidecars, Archives, SharedCache, RayRun, BulkTestCase):
    """All of the above against one server, one collection and one reference run (each costs seconds)."""
