"""Shared test support. Importing it keeps the test run quiet: no download progress bars (none would be
downloaded anyway), and log records go to the test runner's capture rather than to stderr (tests that expect a
log line assert it with assertLogs)."""
import logging
import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
logging.getLogger().addHandler(logging.NullHandler())
