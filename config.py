"""One frozen Config, built once from defaults < .env < process environment < command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from allocator import MODES as ALLOCATORS
from captioners import DEFAULT_FAMILY, FAMILIES
from errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
CACHE_BACKENDS = ("auto", "redis", "memory", "off")
MiB = 1024 * 1024


@dataclass(frozen=True)
class Setting:
    """How one Config field is named on the command line and in the environment."""

    env: str
    flag: str | None = None
    help: str = ""


def _setting(default: Any, env: str, flag: str | None = None, help: str = "") -> Any:
    return field(default=default, metadata={"setting": Setting(env, flag, help)})


@dataclass(frozen=True)
class Config:
    """Every setting of the service; see .env.example for the variables and their meaning."""

    family: str = _setting(DEFAULT_FAMILY, "MODEL_FAMILY", None, "a family id: " + ", ".join(FAMILIES))
    model_path: str | None = _setting(None, "MODEL_PATH", "--model-path",
                                      "local checkpoint folder or Hugging Face id of the chosen family")
    revision: str | None = _setting(None, "MODEL_REVISION", "--revision", "hub revision (branch, tag or commit)")
    device: str = _setting("auto", "DEVICE", "--device", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = _setting("auto", "DTYPE", "--dtype", "auto, float32, float16 or bfloat16")
    caption_prompt: str | None = _setting(None, "CAPTION_PROMPT", "--caption-prompt",
                                          "default prompt; a request's `prompt` field overrides it")
    system_prompt: str | None = _setting(None, "SYSTEM_PROMPT", "--system-prompt",
                                         "system turn for the chat families (Gemma 3, InternVL3)")
    max_new_tokens: int = _setting(30, "MAX_NEW_TOKENS", "--max-new-tokens", "longest caption, in tokens")
    min_new_tokens: int = _setting(0, "MIN_NEW_TOKENS", None,
                                   "shortest caption, in tokens (0: none; the benchmark pins caption length)")
    max_batch_size: int = _setting(0, "MAX_BATCH_SIZE", "--max-batch-size",
                                   "images per generate() call (0: by device, 8 on a CPU, 64 on a CUDA GPU)")
    batch_wait_ms: float = _setting(5.0, "BATCH_WAIT_MS", None, "how long a batch may wait to fill")
    max_queue_images: int = _setting(256, "MAX_QUEUE_IMAGES", None, "queued images before 503")
    host: str = _setting("127.0.0.1", "HOST", "--host", "address to listen on (0.0.0.0 to expose)")
    port: int = _setting(5001, "PORT", "--port", "port to listen on")
    threads: int = _setting(8, "SERVER_THREADS", "--threads", "HTTP worker threads")
    redis_url: str | None = _setting(None, "REDIS_URL", None, "redis:// or rediss:// URL; overrides REDIS_*")
    redis_host: str = _setting("127.0.0.1", "REDIS_HOST")
    redis_port: int = _setting(6379, "REDIS_PORT")
    redis_db: int = _setting(0, "REDIS_DB")
    redis_password: str | None = _setting(None, "REDIS_PASSWORD")
    redis_timeout_seconds: float = _setting(0.25, "REDIS_TIMEOUT_SECONDS")
    cache_backend: str = _setting("auto", "CACHE_BACKEND", None, "auto, redis, memory or off")
    cache_ttl_seconds: int = _setting(86400, "CACHE_TTL_SECONDS")
    cache_prefix: str = _setting("imgcap", "CACHE_PREFIX")
    cache_lock_seconds: float = _setting(60.0, "CACHE_LOCK_SECONDS", None,
                                         "how long a replica may hold the claim on an image it is captioning")
    memory_cache_max_entries: int = _setting(10000, "MEMORY_CACHE_MAX_ENTRIES")
    admin_token: str | None = _setting(None, "ADMIN_TOKEN")
    max_request_bytes: int = _setting(64 * MiB, "MAX_REQUEST_BYTES")
    max_files_per_request: int = _setting(32, "MAX_FILES_PER_REQUEST")
    max_file_bytes: int = _setting(20 * MiB, "MAX_FILE_BYTES")
    max_image_pixels: int = _setting(50_000_000, "MAX_IMAGE_PIXELS")
    max_num_beams: int = _setting(4, "MAX_NUM_BEAMS", None,
                                  "largest num_beams a request may ask for (beam search; 1: greedy only)")
    image_urls: bool = _setting(True, "IMAGE_URLS", None, "fetch images that requests give by URL (off: refuse them)")
    image_url_allowed_hosts: str | None = _setting(
        None, "IMAGE_URL_ALLOWED_HOSTS", None,
        "hosts image URLs may reach even on private or loopback addresses, comma-separated: name, name:port, "
        "[v6]:port or a CIDR network")
    image_url_allow_private: bool = _setting(False, "IMAGE_URL_ALLOW_PRIVATE", None,
                                             "let image URLs reach any address (private networks, loopback)")
    image_url_timeout_seconds: float = _setting(15.0, "IMAGE_URL_TIMEOUT_SECONDS", None,
                                                "deadline of one image URL fetch, redirects included")
    api_key: str | None = _setting(None, "API_KEY", None,
                                   "when set, /caption-images and /v1/* need 'Authorization: Bearer <API_KEY>'")
    decode_budget_pixels: int = _setting(0, "DECODE_BUDGET_PIXELS", None,
                                         "pixels decoded and preprocessed at once, all requests together "
                                         "(0: MAX_IMAGE_PIXELS); more waits for room")
    header_timeout_seconds: float = _setting(10.0, "HEADER_TIMEOUT_SECONDS", None,
                                             "a request's headers must arrive within this time")
    body_timeout_seconds: float = _setting(120.0, "BODY_TIMEOUT_SECONDS", None,
                                           "a request's body must arrive within this time after its headers")
    idle_timeout_seconds: float = _setting(30.0, "IDLE_TIMEOUT_SECONDS", None,
                                           "an idle keep-alive connection is closed after this time")
    connection_limit: int = _setting(1000, "CONNECTION_LIMIT", None, "open client connections at most")
    allowed_hosts: str | None = _setting(None, "ALLOWED_HOSTS", None,
                                         "Host names accepted, comma-separated (.example.com for subdomains, * "
                                         "for any); default: the loopback names and HOST")
    shutdown_grace_seconds: float = _setting(30.0, "SHUTDOWN_GRACE_SECONDS", None,
                                             "on SIGTERM/SIGINT, how long accepted requests may take to finish")
    spacy_model: str | None = _setting(None, "SPACY_MODEL")
    log_level: str = _setting("INFO", "LOG_LEVEL")
    log_format: str = _setting("text", "LOG_FORMAT", None, "text or json")
    warmup: bool = _setting(True, "WARMUP", None, "caption one blank image before reporting ready")
    allocator: str = _setting("auto", "ALLOCATOR", None,
                              "memory allocator: auto (jemalloc where installed, else the system's malloc), "
                              "jemalloc, system, or the path of a libjemalloc.so")

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"unknown model family {self.family!r} (MODEL_FAMILY or one of the flags "
                            f"{', '.join(f.flag for f in FAMILIES.values())}; choose one of {', '.join(FAMILIES)})")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            problems.append(f"{_describe('device')} must be one of auto, cpu, cuda, cuda:N, mps, not {self.device!r}")
        if self.dtype not in DTYPES:
            problems.append(f"{_describe('dtype')} must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.cache_backend not in CACHE_BACKENDS:
            problems.append(f"CACHE_BACKEND must be one of {', '.join(CACHE_BACKENDS)}, not {self.cache_backend!r}")
        if self.allocator not in ALLOCATORS and "/" not in self.allocator:
            problems.append(f"ALLOCATOR must be one of {', '.join(ALLOCATORS)} or the path of a libjemalloc.so, "
                            f"not {self.allocator!r}")
        if self.log_format not in ("text", "json"):
            problems.append(f"LOG_FORMAT must be text or json, not {self.log_format!r}")
        for name in ("max_new_tokens", "port", "threads", "cache_ttl_seconds", "max_request_bytes",
                     "max_files_per_request", "max_file_bytes", "max_image_pixels", "max_queue_images",
                     "memory_cache_max_entries", "connection_limit", "header_timeout_seconds",
                     "body_timeout_seconds", "idle_timeout_seconds", "max_num_beams", "image_url_timeout_seconds"):
            if getattr(self, name) <= 0:
                problems.append(f"{_describe(name)} must be a positive number, not {getattr(self, name)}")
        if self.max_queue_images < self.max_files_per_request:
            problems.append(f"MAX_QUEUE_IMAGES ({self.max_queue_images}) must be at least MAX_FILES_PER_REQUEST "
                            f"({self.max_files_per_request}), or a full request could never be accepted")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append("MIN_NEW_TOKENS must be between 0 and MAX_NEW_TOKENS")
        if self.decode_budget_pixels < 0 or self.shutdown_grace_seconds < 0 or self.max_batch_size < 0:
            problems.append("DECODE_BUDGET_PIXELS, SHUTDOWN_GRACE_SECONDS and MAX_BATCH_SIZE must be >= 0")
        if self.batch_wait_ms < 0 or self.redis_timeout_seconds <= 0 or self.cache_lock_seconds <= 0:
            problems.append("BATCH_WAIT_MS must be >= 0, REDIS_TIMEOUT_SECONDS and CACHE_LOCK_SECONDS > 0")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def redis_target(self) -> str:
        """Where the Redis cache lives, for logs (never includes the password)."""
        if self.redis_url:
            from urllib.parse import urlsplit

            parts = urlsplit(self.redis_url)
            return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or ''}"
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def trusted_hosts(self) -> list[str] | None:
        """The Host names requests may carry (None: any). By default the loopback names and HOST itself, and
        for a wildcard HOST this machine's own names, so that a DNS-rebinding page cannot borrow the service."""
        if self.allowed_hosts:
            names = [name.strip().lower() for name in self.allowed_hosts.split(",") if name.strip()]
            return None if "*" in names else names
        names = ["localhost", "127.0.0.1", "[::1]"]
        if self.host in ("0.0.0.0", "::", ""):
            import socket

            names += [socket.gethostname().lower(), socket.getfqdn().lower()]
            try:
                names += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
            except OSError:
                pass
        else:
            names.append(self.host.lower())
        return [f"[{name}]" if ":" in name and not name.startswith("[") else name for name in dict.fromkeys(names)]

    def replace(self, **changes: Any) -> "Config":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _describe(name: str) -> str:
    """How a setting is named in messages: its flag and its variable, since either may have set it."""
    s: Setting = _settings()[name]
    return f"{s.flag} ({s.env})" if s.flag else s.env


def _settings() -> dict[str, Setting]:
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(Config)}


def _converter(f: dataclasses.Field) -> Callable[[str], Any]:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    if kind.startswith("bool"):
        return _parse_bool
    return str


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


SERVER_DESCRIPTION = ("Image captioning and tagging service. Every flag can also be set in the environment or in "
                      ".env (see .env.example); flags win over the environment, which wins over .env.")


def build_parser(prog: str = "python app.py", description: str = SERVER_DESCRIPTION,
                 **kwargs: Any) -> argparse.ArgumentParser:
    """The command line of SPEC §3 (argparse exits with code 2 on usage errors); other commands (bulk.py) add
    their own arguments to it."""
    parser = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    models = parser.add_mutually_exclusive_group()
    for family in FAMILIES.values():
        default = "; the default" if family.id == DEFAULT_FAMILY else ""
        models.add_argument(family.flag, dest="family", action="store_const", const=family.id,
                            help=f"{family.name} ({family.default_checkpoint}){default}")
    for f in dataclasses.fields(Config):
        s: Setting = f.metadata["setting"]
        if s.flag:
            parser.add_argument(s.flag, dest=f.name, default=None, type=_converter(f),
                                help=f"{s.help} (env {s.env}; default {f.default})")
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                dotenv_path: str | os.PathLike | None = None) -> Config:
    """Build the Config: defaults < .env < environment < flags. Raises ConfigError on bad values."""
    return config_from_args(build_parser().parse_args(list(argv) if argv is not None else None), environ,
                            dotenv_path)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                     dotenv_path: str | os.PathLike | None = None) -> Config:
    """The Config of parsed flags (from build_parser) over the environment and .env."""
    environ = os.environ if environ is None else environ
    dotenv = read_dotenv(dotenv_path if dotenv_path is not None else dotenv_file(environ))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        s: Setting = f.metadata["setting"]
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        # An empty variable means "not set" (as in .env.example): the next source down decides.
        raw = environ.get(s.env, "").strip() or dotenv.get(s.env, "").strip()
        if not raw:
            continue
        try:
            values[f.name] = _converter(f)(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{s.env}={raw!r} is not valid: {exc}") from None
    if "family" in values:
        values["family"] = values["family"].replace("-", "_")
    return Config(**values)


def dotenv_file(environ: Mapping[str, str]) -> Path:
    """The .env to read: ENV_FILE when set; else .env in the working directory; else .env beside app.py (so that
    `python /path/to/app.py` finds the checkout's own settings from anywhere)."""
    if environ.get("ENV_FILE"):
        return Path(environ["ENV_FILE"])
    here = Path.cwd() / ".env"
    return here if here.is_file() else Path(__file__).resolve().parent / ".env"


def read_dotenv(path: str | os.PathLike) -> dict[str, str]:
    """The variables of a .env file (python-dotenv), without touching os.environ; {} when absent."""
    if not Path(path).is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}
