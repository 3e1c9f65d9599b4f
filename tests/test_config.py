"""config.load_config: flag > environment > .env > default, validation, .env.example, and a torch-free --help."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import pytest

from config import Config, build_parser, load_config
from errors import ConfigError
from support.services import REPO_ROOT

pytestmark = pytest.mark.inprocess

SETTINGS = {f.name: f.metadata["setting"] for f in dataclasses.fields(Config)}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


class LoadConfigCase(unittest.TestCase):
    """load_config with an explicit environment and .env file, so the real ones never leak in."""

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.dotenv = Path(self.tmp.name) / ".env"

    def load(self, argv: list[str] | None = None, env: dict[str, str] | None = None,
             dotenv: str | None = None) -> Config:
        if dotenv is not None:
            self.dotenv.write_text(dotenv)
        return load_config(argv or [], environ=env or {}, dotenv_path=self.dotenv)


class PrecedenceTest(LoadConfigCase):
    def test_defaults(self) -> None:
        config = self.load()
        self.assertEqual(config, Config())
        self.assertEqual((config.port, config.host, config.family), (5001, "127.0.0.1", "blip"))
        self.assertIsNone(config.caption_prompt)
        self.assertIsNone(config.admin_token)
        self.assertEqual(config.cache_ttl_seconds, 86400)

    def test_flag_beats_environment_beats_dotenv_beats_default(self) -> None:
        cases = [  # (field, flag, flag value, env/.env values, expected for flag, env, .env)
            ("port", "--port", "7001", ("7002", "7003"), (7001, 7002, 7003)),
            ("host", "--host", "0.0.0.0", ("10.0.0.2", "10.0.0.3"), ("0.0.0.0", "10.0.0.2", "10.0.0.3")),
            ("caption_prompt", "--caption-prompt", "a photo of", ("a drawing of", "a painting of"),
             ("a photo of", "a drawing of", "a painting of")),
            ("max_new_tokens", "--max-new-tokens", "11", ("12", "13"), (11, 12, 13)),
            ("max_batch_size", "--max-batch-size", "2", ("3", "4"), (2, 3, 4)),
            ("dtype", "--dtype", "float16", ("bfloat16", "float32"), ("float16", "bfloat16", "float32")),
        ]
        for name, flag, flag_value, (env_value, dotenv_value), (by_flag, by_env, by_dotenv) in cases:
            with self.subTest(name):
                var = SETTINGS[name].env
                dotenv = f"{var}={dotenv_value}\n"
                env = {var: env_value}
                self.assertEqual(getattr(self.load([flag, flag_value], env, dotenv), name), by_flag)
                self.assertEqual(getattr(self.load([], env, dotenv), name), by_env)
                self.assertEqual(getattr(self.load([], {}, dotenv), name), by_dotenv)
                self.assertEqual(getattr(self.load([], {}, ""), name), DEFAULTS[name])

    def test_model_flag_beats_model_family_variable(self) -> None:
        self.assertEqual(self.load(["--gemma"], {"MODEL_FAMILY": "blip2"}, "MODEL_FAMILY=intern_vlm\n").family,
                         "gemma")
        self.assertEqual(self.load(["--blip"], {"MODEL_FAMILY": "gemma"}).family, "blip")
        self.assertEqual(self.load([], {"MODEL_FAMILY": "blip2"}, "MODEL_FAMILY=gemma\n").family, "blip2")
        self.assertEqual(self.load([], {}, "MODEL_FAMILY=gemma\n").family, "gemma")
        self.assertEqual(self.load([], {"MODEL_FAMILY": "intern-vlm"}).family, "intern_vlm")
        self.assertEqual(self.load(["--intern-vlm"]).family, "intern_vlm")

    def test_settings_without_flags_come_from_environment_and_dotenv(self) -> None:
        dotenv = "ADMIN_TOKEN=from-dotenv\nCACHE_PREFIX=dot\nMAX_FILE_BYTES=1000\nWARMUP=false\n"
        config = self.load([], {"CACHE_PREFIX": "env", "MAX_QUEUE_IMAGES": "90", "REDIS_TIMEOUT_SECONDS": "0.1"},
                           dotenv)
        self.assertEqual((config.admin_token, config.cache_prefix, config.max_file_bytes, config.warmup),
                         ("from-dotenv", "env", 1000, False))
        self.assertEqual((config.max_queue_images, config.redis_timeout_seconds), (90, 0.1))

    def test_dotenv_quotes_and_comments(self) -> None:
        config = self.load([], {}, '# a comment\nCAPTION_PROMPT="a photo of"\nPORT=6001  # inline\n')
        self.assertEqual((config.caption_prompt, config.port), ("a photo of", 6001))

    def test_env_file_variable_chooses_the_dotenv_file(self) -> None:
        self.dotenv.write_text("PORT=6123\n")
        config = load_config([], environ={"ENV_FILE": str(self.dotenv)})
        self.assertEqual(config.port, 6123)
        self.assertEqual(load_config([], environ={"ENV_FILE": os.devnull}).port, 5001)

    def test_empty_environment_variable_falls_through_to_dotenv(self) -> None:
        self.assertEqual(self.load([], {"PORT": ""}, "PORT=6000\n").port, 6000)

    def test_queue_must_hold_a_full_request(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load([], {"MAX_QUEUE_IMAGES": "9"})
        self.assertIn("MAX_QUEUE_IMAGES", str(caught.exception))

    def test_empty_values_mean_default(self) -> None:
        env = {"PORT": "", "HOST": "  ", "CAPTION_PROMPT": "", "MAX_NEW_TOKENS": "", "ADMIN_TOKEN": "",
               "WARMUP": ""}
        self.assertEqual(self.load([], env), Config())
        dotenv = "PORT=\nHOST=\nCAPTION_PROMPT=\nMAX_NEW_TOKENS=\nADMIN_TOKEN=\nREDIS_URL=\n"
        self.assertEqual(self.load([], {}, dotenv), Config())

    def test_booleans(self) -> None:
        for text, value in (("true", True), ("1", True), ("Yes", True), ("on", True), ("false", False),
                            ("0", False), ("no", False), ("OFF", False)):
            with self.subTest(text):
                self.assertIs(self.load([], {"WARMUP": text}).warmup, value)


class ValidationTest(LoadConfigCase):
    def assert_config_error_names(self, env: dict[str, str], *names: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load([], env)
        for name in names:
            self.assertIn(name, str(caught.exception))

    def test_unparsable_values_name_the_variable(self) -> None:
        for var, value in (("PORT", "abc"), ("MAX_NEW_TOKENS", "1.5"), ("WARMUP", "maybe"),
                           ("REDIS_TIMEOUT_SECONDS", "fast"), ("MAX_REQUEST_BYTES", "64MB")):
            with self.subTest(var):
                self.assert_config_error_names({var: value}, var, value)

    def test_out_of_range_values_from_the_environment_name_the_variable(self) -> None:
        # A user who wrote PORT=0 in .env must be told about PORT (a message naming only --port, a flag they
        # never used, sends them looking in the wrong place).
        for var, value in (("PORT", "0"), ("MAX_BATCH_SIZE", "-1"), ("MAX_NEW_TOKENS", "0"),
                           ("MAX_FILES_PER_REQUEST", "0"), ("MAX_IMAGE_PIXELS", "-5"), ("DEVICE", "tpu"),
                           ("DTYPE", "int8"), ("CACHE_BACKEND", "disk"), ("LOG_FORMAT", "xml"),
                           ("MODEL_FAMILY", "llava"), ("MIN_NEW_TOKENS", "99"), ("BATCH_WAIT_MS", "-1"),
                           ("REDIS_TIMEOUT_SECONDS", "0")):
            with self.subTest(var):
                self.assert_config_error_names({var: value}, var)

    def test_bad_flag_values(self) -> None:
        with self.assertRaises(ConfigError):
            self.load(["--device", "cuda:x"])
        with self.assertRaises(SystemExit) as caught, contextlib.redirect_stderr(io.StringIO()) as usage:
            self.load(["--port", "abc"])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("invalid int value: 'abc'", usage.getvalue())
        self.assertEqual(self.load(["--device", "cuda:1"]).device, "cuda:1")

    def test_two_model_flags_are_a_usage_error(self) -> None:
        for flags in (["--blip", "--gemma"], ["--blip2", "--intern-vlm"], ["--gemma", "--gemma", "--blip"]):
            with self.subTest(flags), self.assertRaises(SystemExit) as caught:
                with contextlib.redirect_stderr(io.StringIO()):
                    self.load(flags)
            self.assertEqual(caught.exception.code, 2)

    def test_config_is_frozen_and_replace_validates(self) -> None:
        config = Config()
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.port = 1  # type: ignore[misc]
        self.assertEqual(config.replace(port=6000).port, 6000)
        with self.assertRaises(ConfigError):
            config.replace(max_file_bytes=0)


class EnvExampleTest(unittest.TestCase):
    """.env.example lists every setting with its default and a one-line comment (SPEC §3)."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.lines = (REPO_ROOT / ".env.example").read_text().splitlines()
        cls.values: dict[str, str] = {}
        cls.comment_above: dict[str, str] = {}
        for i, line in enumerate(cls.lines):
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                name, _, value = line.partition("=")
                cls.values[name.strip()] = value.strip()
                cls.comment_above[name.strip()] = cls.lines[i - 1] if i else ""

    def test_every_setting_is_listed_once_and_nothing_else(self) -> None:
        names = [line.partition("=")[0].strip() for line in self.lines
                 if line.strip() and not line.lstrip().startswith("#")]
        self.assertEqual(len(names), len(set(names)), "a variable is listed twice")
        self.assertEqual(set(names), {s.env for s in SETTINGS.values()})

    def test_each_value_is_the_default(self) -> None:
        for f in dataclasses.fields(Config):
            var = f.metadata["setting"].env
            with self.subTest(var):
                text = self.values[var]
                if f.default is None:
                    self.assertEqual(text, "", f"{var} has no default, so .env.example must leave it empty")
                    continue
                parsed = load_config([], environ={var: text}, dotenv_path=os.devnull)
                self.assertEqual(getattr(parsed, f.name), f.default)
                self.assertNotEqual(text, "", f"{var}: write the default ({f.default}) rather than leave it empty")

    def test_each_variable_has_a_comment(self) -> None:
        for var, above in self.comment_above.items():
            with self.subTest(var):
                self.assertTrue(above.startswith("# ") and len(above) > 4, f"no comment above {var}")

    def test_the_example_loads_as_a_dotenv_file(self) -> None:
        self.assertEqual(load_config([], environ={}, dotenv_path=REPO_ROOT / ".env.example"), Config())


class CommandLineTest(unittest.TestCase):
    """The parser and `python app.py --help` need neither torch nor transformers."""

    def run_python(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "ENV_FILE": os.devnull, **(env or {})})

    def test_importing_app_and_building_the_parser_imports_no_torch(self) -> None:
        code = ("import sys, app, config; config.build_parser(); "
                "print(sorted(m for m in ('torch', 'transformers', 'spacy', 'redis') if m in sys.modules))")
        result = self.run_python("-c", code)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "[]")

    def test_help_works_without_importing_torch(self) -> None:
        result = self.run_python("-X", "importtime", "app.py", "--help")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        for flag in ("--blip", "--blip2", "--gemma", "--intern-vlm", "--caption-prompt", "--port", "--host",
                     "--model-path", "--revision", "--device", "--dtype", "--max-new-tokens", "--max-batch-size",
                     "--system-prompt"):
            self.assertIn(flag, result.stdout)
        imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        self.assertNotIn("torch", imported)
        self.assertNotIn("transformers", imported)

    def test_two_model_flags_exit_2_with_a_message(self) -> None:
        result = self.run_python("app.py", "--blip", "--gemma")
        self.assertEqual(result.returncode, 2)
        self.assertIn("not allowed with argument", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_bad_environment_value_exits_2_naming_the_variable(self) -> None:
        result = self.run_python("app.py", env={"MAX_FILE_BYTES": "lots"})
        self.assertEqual(result.returncode, 2)
        self.assertIn("MAX_FILE_BYTES", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_parser_help_names_each_variable(self) -> None:
        text = " ".join(build_parser().format_help().split())  # argparse wraps lines anywhere
        for setting in SETTINGS.values():
            if setting.flag:
                self.assertIn(f"env {setting.env}", text)


if __name__ == "__main__":
    unittest.main()
