"""The recognizers behind the redactor, all offline and (where the type has one) checksum-validated.

Presidio ships IBAN (mod-97), credit card (Luhn) and IP recognizers that we use as they are. Three we adapt:

- e-mail: Presidio validates the domain with `tldextract.extract`, whose default extractor tries to fetch the
  public-suffix list over the network on first use; ours uses `TLDExtract(suffix_list_urls=())` (the snapshot that
  ships inside tldextract, nothing fetched).
- phone: Presidio's PhoneRecognizer searches a handful of default regions (US, GB, DE, FR, IL, IN, CA, BR); ours
  searches the EU/EEA regions plus GB and CH with libphonenumber's VALID leniency, and drops matches that are part of
  an order/invoice/reference token (`ORD-0612345678`, `Bestellnummer 0301234567`).
- person names: spaCy's small models for English and French (given to Presidio by exact package name, so it never
  tries to download one); for Dutch and German no spaCy model is on PyPI, so names are found from the first- and
  last-name lists of Faker's nl/de locales plus title words (Herr, Frau, meneer, mevrouw, ...). `docs/privacy.md`
  measures both, including on names the lists do not hold.
"""

from __future__ import annotations

import functools
import hashlib
import re

import phonenumbers
from presidio_analyzer import (AnalysisExplanation, EntityRecognizer, LocalRecognizer, Pattern, PatternRecognizer,
                               RecognizerResult)
from presidio_analyzer.predefined_recognizers import EmailRecognizer, PhoneRecognizer

# EU + EEA + GB + CH: where tunekit's users and their customers are (phone_regions="eu")
EU_REGIONS = ("AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV", "LT",
              "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO", "GB", "CH")
# the default: numbers in national layout are looked for in these (each region is one libphonenumber pass, the
# bulk of the redactor's time); a number in international layout (+39 ..., 0039 ...) is found whatever its country
WEST_EU_REGIONS = ("GB", "IE", "NL", "BE", "LU", "FR", "DE", "AT", "CH", "IT", "ES", "PT", "PL", "DK", "SE")
LANGUAGES = ("en", "nl", "fr", "de")
# Faker locales whose name lists back the lexicon recognizer, per language
NAME_LOCALES = {"en": ("en_GB", "en_US", "en_IE"), "nl": ("nl_NL", "nl_BE"), "fr": ("fr_FR", "fr_BE", "fr_CH"),
                "de": ("de_DE", "de_AT", "de_CH")}


@functools.lru_cache(maxsize=1)
def offline_tld_extractor():
    import tldextract

    # suffix_list_urls=() : only the public-suffix snapshot bundled with tldextract; never a network fetch
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


class OfflineEmailRecognizer(EmailRecognizer):
    def validate_result(self, pattern_text: str):
        return offline_tld_extractor()(pattern_text.rsplit("@", 1)[-1]).fqdn != ""

    def analyze(self, text, entities, nlp_artifacts=None, regex_flags=None):
        results = super().analyze(text, entities, nlp_artifacts, regex_flags)
        seen = {(r.start, r.end) for r in results}
        # an address glued to following letters ("jan@example.nlgroups": a model's tokens after an echoed prompt):
        # the longest known suffix at the start of the last label ends the address
        for m in re.finditer(self.PATTERNS[0].regex, text):
            if any(s <= m.start() < e for s, e in seen):
                continue
            value = m.group()
            head, _, last = value.rpartition(".")
            for k in range(len(last) - 1, 1, -1):
                if self.validate_result(f"{head}.{last[:k]}") and \
                        offline_tld_extractor()(f"{head.rsplit('@', 1)[-1]}.{last[:k]}").suffix.endswith(last[:k]):
                    end = m.start() + len(head) + 1 + k
                    results.append(RecognizerResult("EMAIL_ADDRESS", m.start(), end, 1.0,
                                                    AnalysisExplanation(type(self).__name__, 1.0)))
                    break
        return results


# a digit run glued to letters/hyphen before it (ORD-061..., INV0612...) or introduced by an order/reference word
_REFERENCE_BEFORE = re.compile(
    r"(?:[A-Za-z]{1,6}[-_/#]?|#|(?:order|ordernummer|bestelling|bestelnummer|bestellnummer|bestellung|commande|"
    r"référence|reference|ref|referentie|rechnungsnummer|rechnung|factuurnummer|factuur|facture|invoice|"
    r"kundennummer|klantnummer|n°|nr\.?|no\.?|ticket)[\s\"':#_\-]*(?:id|number|nummer|numéro|no\.?|nr\.?|n°)?"
    r"[\s\"':#=]*)$", re.IGNORECASE)


# a letter or symbol glued to the end of a digit run ("12345678abc", "12345678%|"): libphonenumber refuses a number
# followed by either, and a model's tokens can follow an echoed prompt that way
_GLUED_LETTER = re.compile(r"(?<=\d)(?:[^\W\d_]|[%|#*~^`@&=<>\[\]{}\\])")
_DATE = re.compile(r"^(?:\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|(?:19|20)\d\d[/-]\d+)$")
_MONEY_BEFORE = re.compile(r"(?:€|eur|gbp|chf|usd|\$|£)\s*[\d.,]*$", re.IGNORECASE)


def _not_a_phone(text: str, start: int, end: int) -> bool:
    """A libphonenumber match that is a reference, date, amount or a piece of a longer digit run."""
    value = text[start:end]
    before = text[max(0, start - 24):start]
    return (sum(c.isdigit() for c in value) < 7 or bool(_REFERENCE_BEFORE.search(before))
            or bool(_DATE.match(value)) or bool(_MONEY_BEFORE.search(before))
            or bool(re.search(r"\d[ -]?$", before)) or bool(re.match(r"^[ -]?\d", text[end:end + 2])))


class LuhnCardRecognizer(PatternRecognizer):
    """Card numbers of 12-19 digits (Maestro's 12 and Visa's 19 included: Presidio's pattern stops at 13-16),
    in groups split by spaces or hyphens, with a major-network first digit (1-6: JCB 1800 to Discover 6; and Maestro 0604, which Faker issues), Luhn-validated."""

    PATTERNS = [Pattern("card 12-19 digits", r"(?<![\d-])(?:0604|[1-6]\d{3})(?:[ -]?\d){8,15}(?![\d-])", 0.3)]

    def __init__(self, supported_language: str = "en"):
        super().__init__(supported_entity="CREDIT_CARD", patterns=self.PATTERNS, supported_language=supported_language,
                         context=["card", "carte", "kaart", "karte", "visa", "mastercard", "creditcard"])

    def validate_result(self, pattern_text: str) -> bool:
        digits = [int(c) for c in pattern_text if c.isdigit()]
        if not 12 <= len(digits) <= 19:
            return False
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
        return total % 10 == 0


class EuPhoneRecognizer(PhoneRecognizer):
    """libphonenumber over the EU regions; a match must be a valid number and not part of a reference token."""

    SCORE = 0.6

    def __init__(self, supported_language: str = "en", context=None, regions=WEST_EU_REGIONS):
        super().__init__(supported_language=supported_language, supported_regions=regions,
                         leniency=phonenumbers.Leniency.VALID, context=context)

    def analyze(self, text, entities, nlp_artifacts=None):
        found = {}
        if len(re.findall(r"\d", text)) < 7:  # no EU number has fewer digits; skips 32 matcher passes
            return []
        # libphonenumber refuses a number glued to letters or symbols ("+49 30 12345678abc", "...678%|", as a
        # model's tokens can follow an echoed prompt); match on a same-length copy with them blanked, check context
        # on the original
        shadow = _GLUED_LETTER.sub(" ", text)
        for region in self.supported_regions:
            for match in phonenumbers.PhoneNumberMatcher(shadow, region, leniency=self.leniency):
                if _not_a_phone(text, match.start, match.end):
                    continue
                found.setdefault((match.start, match.end), match)
        results = [RecognizerResult(self.supported_entities[0], s, e, self.SCORE,
                                    AnalysisExplanation(type(self).__name__, self.SCORE),
                                    recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                                          RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id})
                   for (s, e) in found]
        return EntityRecognizer.remove_duplicates(results)


TITLES = {"en": ["mr", "mrs", "ms", "miss", "dr", "prof", "sir", "dear"],
          "nl": ["meneer", "mevrouw", "mevr", "dhr", "heer", "dr", "prof", "mr", "beste", "geachte", "ir", "drs"],
          "fr": ["m", "mme", "mlle", "monsieur", "madame", "mademoiselle", "dr", "prof", "me", "cher", "chère"],
          "de": ["herr", "herrn", "frau", "dr", "prof", "liebe", "lieber", "hallo"]}
PARTICLES = {"van", "de", "der", "den", "ter", "ten", "te", "het", "'t", "von", "zu", "vom", "zum",
             "du", "des", "la", "le", "d'", "di", "da", "dos", "mc", "o'"}
# capitalised words that start sentences or name things and are also in some name list
STOP = {"de", "het", "een", "der", "die", "das", "le", "la", "les", "the", "and", "en", "und", "et", "for",
        "voor", "pour", "für", "dear", "beste", "january", "february", "march", "april", "may", "june", "july",
        "august", "september", "october", "november", "december", "monday", "friday", "sunday", "iban", "bic",
        "invoice", "factuur", "facture", "rechnung", "total", "totaal", "gmbh", "bv", "nv", "sa", "sarl", "ltd",
        "mai", "juni", "juli", "mars", "avril", "mei", "maart", "order", "bestelling", "commande", "bestellung"}
# words that introduce a person in letters, forms and tickets: a run of two or more capitalised words right after
# one is a name even when neither word is on the lists (`namens Elżbieta Kopiczko`, `Ansprechpartner: Ayşe Akça`)
CUES = {"en": ["by", "from", "with", "customer", "client", "contact", "regards", "name is", "i am", "i'm", "signed",
               "applicant", "tenant", "sender", "recipient", "attn", "attn.", "colleague", "on behalf of"],
        "nl": ["namens", "volgens", "met", "door", "klant", "klantnaam", "contactpersoon", "aanvrager",
               "aanvraagster", "afzender", "ontvanger", "huurder", "verhuurder", "collega", "naam is", "ik ben",
               "ik heet", "heet", "t.a.v.", "tav", "t.a.v", "groet", "groeten", "groetjes", "gegroet", "getekend",
               "ondergetekende", "behandelaar", "medewerker", "monteur", "bezorger", "chauffeur"],
        "de": ["mit", "laut", "durch", "kunde", "kundin", "ansprechpartner", "ansprechpartnerin", "kontakt",
               "antragsteller", "antragstellerin", "absender", "empfänger", "mieter", "mieterin", "vermieter",
               "kollege", "kollegin", "name ist", "ich bin", "ich heiße", "heiße", "z. h.", "z.h.", "zu händen",
               "grüße", "grüßen", "gruß", "gez.", "unterzeichnet", "sachbearbeiter", "sachbearbeiterin",
               "mitarbeiter", "mitarbeiterin", "techniker", "fahrer", "im auftrag von", "i. a.", "i.a."],
        "fr": ["de", "par", "avec", "client", "cliente", "contact", "je suis", "je m'appelle", "nom est",
               "cordialement", "signé", "demandeur", "locataire", "expéditeur", "destinataire", "collègue"]}
# last-name endings common among EU residents (Dutch/Frisian, German, Nordic, Slavic, Turkish, Romance): after a
# capitalised word they make a name even without a list entry or a cue
SURNAME_ENDINGS = ("stra", "sma", "ema", "inga", "enga", "ink", "huis", "mann", "meier", "meyer", "mayer", "bauer",
                   "hofer", "huber", "berger", "dorf", "sen", "ssen", "son", "strøm", "ström", "gaard", "ski", "ska",
                   "cki", "cka", "dzki", "wicz", "czyk", "czak", "ová", "ský", "ská", "ić", "vić", "oğlu", "escu",
                   "elli", "etti", "ucci", "ini", "ez", "es")
# capitalised words that begin sentences or name organisations and places, not people
STOP |= {"bij", "naar", "om", "over", "na", "tot", "uit", "zonder", "gemeente", "provincie", "koninklijke",
         "stichting", "vereniging", "universiteit", "ministerie", "hogeschool", "bank", "bei", "nach", "aus", "seit",
         "gemeinde", "stadt", "stadtwerke", "landratsamt", "deutsche", "bundes", "universität", "sparkasse",
         "volksbank", "verein", "stiftung", "amt", "ministerium", "financial", "services", "allgemeine",
         "allgemeinen", "algemene", "nederlandse", "europäische", "europese", "rijks", "het", "im", "am", "zur",
         "ich", "ik", "wir", "wij", "u", "sie", "hij", "zij", "er", "es", "hallo", "hoi", "dag", "goedemorgen",
         "guten", "tag", "morgen", "kunt", "können", "mijn", "mein", "meine", "ihr", "uw", "ihre"}
STOP |= {c for cues in CUES.values() for c in cues if " " not in c and c not in PARTICLES}  # `Namens Jan`: not a name
_WORD = re.compile(r"[^\W\d_][^\W\d_'’\-]*\.?")  # letters of any script: Elżbieta, Ertaş, Čechová


def _name_key(word: str) -> str:
    return word.strip(".").lower()


def _held_out(name: str) -> bool:
    """A stable half of all names (by hash), left out of the lexicon when measuring names it has never seen."""
    return hashlib.sha256(name.lower().encode()).digest()[0] & 1 == 1


@functools.lru_cache(maxsize=16)
def name_lexicon(holdout: bool = False) -> tuple[frozenset, frozenset]:
    """(first names, last names), lower-cased, from Faker's person providers of the en/nl/fr/de locales."""
    import importlib

    first, last = set(), set()
    # every language's lists: a Dutch text names German, French and English customers too
    for loc in [loc for lang in NAME_LOCALES for loc in NAME_LOCALES[lang]]:
        p = importlib.import_module(f"faker.providers.person.{loc}").Provider
        for attr in ("first_names", "first_names_male", "first_names_female"):
            first.update(getattr(p, attr, ()))
        last.update(getattr(p, "last_names", ()))
    words = lambda names: frozenset(w.lower() for n in names for w in re.split(r"[\s]+", n)  # noqa: E731
                                    if len(w) > 1 and w.lower() not in STOP and w.lower() not in PARTICLES
                                    and not (holdout and _held_out(n)))
    return words(first), words(last)


class LexiconNameRecognizer(LocalRecognizer):
    """PERSON from name lists and title words, for languages without a spaCy model on PyPI.

    A match is a run of capitalised words (Dutch/German/French particles such as `van der`, `von` allowed inside)
    where a word is a known first name followed by a capitalised word, a known last name preceded by a capitalised
    word, or any capitalised word(s) after a title (Herr, mevrouw, Mme, Dr, ...). Known first names alone count
    only after a greeting/title. Score 0.6.
    """

    SCORE = 0.6

    def __init__(self, supported_language: str, holdout: bool = False):
        self.holdout = holdout
        super().__init__(supported_entities=["PERSON"], supported_language=supported_language,
                         name=f"LexiconNameRecognizer_{supported_language}")

    def load(self) -> None:
        self.first, self.last = name_lexicon(self.holdout)
        self.titles = set(TITLES[self.supported_language])
        self.cues = {tuple(c.split()) for c in CUES[self.supported_language]}

    def analyze(self, text, entities, nlp_artifacts=None):
        if "PERSON" not in entities:
            return []
        words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
        results, i = [], 0
        while i < len(words):
            span = self._name_at(text, words, i)
            if span is None:
                i += 1
                continue
            j, s, e = span
            results.append(RecognizerResult("PERSON", s, e, self.SCORE,
                                            AnalysisExplanation(type(self).__name__, self.SCORE),
                                            recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                                                  RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
            i = j
        return results

    def _cued(self, text, words, i) -> bool:
        """words[i] follows a cue (`namens`, `Ansprechpartner:`, `Groetjes,` + newline), nothing but spaces and
        , : between them."""
        for n in (1, 2, 3):
            if i - n < 0 or re.search(r"[^\s,:]", text[words[i - 1][1]:words[i][0]]):
                continue
            if tuple(_name_key(w[2]) for w in words[i - n:i]) in self.cues:
                return True
        return False

    def _name_at(self, text, words, i):
        """(index after the name, start, end) of a name starting at words[i], or None."""
        cap = lambda k: k < len(words) and words[k][2][0].isupper() and _name_key(words[k][2]) not in STOP  # noqa
        adjacent = lambda a, b: not re.search(r"[\n,;:()\[\]<>@\d]", text[words[a][1]:words[b][0]])  # noqa: E731
        titled = _name_key(words[i][2]) in self.titles and i + 1 < len(words) and adjacent(i, i + 1)
        start = i + 1 if titled else i
        particles_then_cap = lambda k: next((cap(j) and all(adjacent(m, m + 1) for m in range(k, j))  # noqa: E731
                                            for j in range(k, min(k + 4, len(words)))
                                            if _name_key(words[j][2]) not in PARTICLES), False)
        if not (cap(start) or (titled and particles_then_cap(start))):
            return None
        # the run: capitalised words and particles between them (van der, von, de la), on one line
        k = start + 1
        while k < len(words) and adjacent(k - 1, k) and (cap(k) or (_name_key(words[k][2]) in PARTICLES
                                                                    and particles_then_cap(k))):
            k += 1
        run = [_name_key(w[2]) for w in words[start:k]]
        caps = [r for r, w in zip(run, words[start:k]) if w[2][0].isupper() and r not in PARTICLES]
        known = run[0] in self.first and len(caps) >= 2 or any(r in self.last for r in caps[1:]) \
            or (titled and (run[0] in self.first or run[0] in self.last or len(caps) >= 1)) \
            or (len(caps) >= 2 and (self._cued(text, words, start) or caps[-1].endswith(SURNAME_ENDINGS)))
        if not known:
            return None
        end = k
        while end > start and _name_key(words[end - 1][2]) in PARTICLES:
            end -= 1
        return k, words[start][0], words[end - 1][1] - (1 if words[end - 1][2].endswith(".") else 0)
