"""The families the tests run, from the service's registry (captioners/), so that a new family is tested by
adding it there (and its tiny builder in tiny_models.py)."""
from captioners import FAMILIES as REGISTRY

FAMILIES = tuple(REGISTRY)
FLAGS = {family: spec.flag for family, spec in REGISTRY.items()}
PROMPTS = {family: spec.example_prompt for family, spec in REGISTRY.items()}
