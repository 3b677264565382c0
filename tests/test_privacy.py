"""The redactor (privacy/redactor.py): checksummed recognizers, hard negatives, operators, the corpus goals on a
small seeded sample; `tunekit data scan|redact`; train.pii off|warn|refuse|redact."""

from __future__ import annotations

import json
import re

import pytest

from tunekit.privacy.errors import PrivacyError


@pytest.fixture(scope="module")
def redactor():
    from tunekit.privacy.redactor import Redactor

    return Redactor()


@pytest.mark.parametrize("text,lang,entity,value", [
    ("IBAN NL91 ABNA 0417 1643 00 please", "nl", "IBAN_CODE", "NL91 ABNA 0417 1643 00"),
    ("Kontonummer DE89370400440532013000.", "de", "IBAN_CODE", "DE89370400440532013000"),
    ("card 4111 1111 1111 1111 exp 04/29", "en", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("Maestro 501234567896 ok", "en", "CREDIT_CARD", "501234567896"),  # 12 digits: beyond Presidio's pattern
    ("mail jan.devries@example.nl now", "nl", "EMAIL_ADDRESS", "jan.devries@example.nl"),
    ("from 192.168.10.4 and", "en", "IP_ADDRESS", "192.168.10.4"),
    ("bel 06-12345678 of", "nl", "PHONE_NUMBER", "06-12345678"),
    ("appelez le 06 12 34 56 78 svp", "fr", "PHONE_NUMBER", "06 12 34 56 78"),
    ("Tel. +49 30 12345678.", "de", "PHONE_NUMBER", "+49 30 12345678"),
    ("call +49 30 12345678%| lavish", "en", "PHONE_NUMBER", "+49 30 12345678"),  # model tokens glued on
    ("call +49 30 12345678abc", "en", "PHONE_NUMBER", "+49 30 12345678"),
    ("Groet, Jan de Vries", "nl", "PERSON", "Jan de Vries"),
    ("Sehr geehrte Frau Müller,", "de", "PERSON", "Müller"),
    ("Hello, I am John Smith.", "en", "PERSON", "John Smith"),
    ("Bonjour, je suis Marie Dupont.", "fr", "PERSON", "Marie Dupont"),
    # names on no list: letters beyond Latin-1, a cue word before them, a surname ending
    ("Namens Elżbieta Kopiczko stuur ik u de offerte.", "nl", "PERSON", "Elżbieta Kopiczko"),
    ("Ansprechpartner: Şüküfe Ertaş", "de", "PERSON", "Şüküfe Ertaş"),
    ("Viele Grüße\nSoňa Doležal", "de", "PERSON", "Soňa Doležal"),
    ("Heute rief Feyruz Tevetoğlu an.", "de", "PERSON", "Feyruz Tevetoğlu"),
])
def test_finds_each_type(redactor, text, lang, entity, value):
    found = [(f.entity, f.text) for f in redactor.find(text, lang)]
    assert (entity, value) in found


@pytest.mark.parametrize("text,lang", [
    ("IBAN NL91ABNA0417164301 was rejected", "en"),      # one wrong digit: mod-97 fails
    ("card 4111111111111112 failed", "en"),              # one wrong digit: Luhn fails
    ("Bestellnummer 0301234567 wurde versandt.", "de"),  # a Berlin number's shape, but an order number
    ("Referentie ORD-0612345678 staat klaar.", "nl"),
    ("Total due: EUR 1,234.56 by 2025-03-14.", "en"),
    ("Factuur 2024-0612 betreft 12 stuks.", "nl"),
    ("Gemeente Den Haag heeft de vergunning verleend.", "nl"),  # capitalised, and Haag is a last name
    ("Koninklijke Philips meldt hogere omzet.", "nl"),
    ("Die Stadtwerke München melden eine Störung.", "de"),
])
def test_hard_negatives_find_nothing(redactor, text, lang):
    assert redactor.find(text, lang) == []


def test_operators_placeholder_mask_and_keyed_hash(monkeypatch):
    from tunekit.privacy.redactor import Redactor, guess_language, mask_value

    text = "Mail jan.devries@example.nl or JAN.DEVRIES@example.nl"
    assert Redactor().redact(text, "en") == "Mail <EMAIL> or <EMAIL>"
    assert mask_value("jan@example.nl") == "j**@*******.*l"
    monkeypatch.delenv("TUNEKIT_PII_SECRET", raising=False)
    with pytest.raises(PrivacyError, match="TUNEKIT_PII_SECRET"):
        Redactor(operator="hash")
    a = Redactor(operator="hash", secret="deployment-a").redact(text, "en")
    tokens = re.findall(r"<EMAIL:[0-9a-f]{10}>", a)
    assert len(tokens) == 2 and tokens[0] == tokens[1]  # the same address, one token (case-insensitive)
    b = Redactor(operator="hash", secret="deployment-b").redact(text, "en")
    assert re.findall(r"<EMAIL:[0-9a-f]{10}>", b)[0] != tokens[0]  # and another one elsewhere
    assert guess_language("Sehr geehrte Frau, die Rechnung ist bezahlt und wir danken Ihnen") == "de"
    assert guess_language("Beste klant, de factuur is betaald en wij danken u") == "nl"


def test_email_validation_never_fetches_the_suffix_list(monkeypatch, tmp_path):
    import socket

    def no_network(*a, **k):
        raise AssertionError("tldextract tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TLDEXTRACT_CACHE", str(tmp_path))  # a cold cache: it would fetch now if it ever did
    from tunekit.privacy.recognizers import OfflineEmailRecognizer, offline_tld_extractor

    offline_tld_extractor.cache_clear()
    assert offline_tld_extractor()("mail.example.co.uk").suffix == "co.uk"
    assert OfflineEmailRecognizer().validate_result("a.b@example.co.uk")
    assert not OfflineEmailRecognizer().validate_result("a@example.invalidtld")


def test_corpus_sample_meets_the_goals(redactor):
    """A 400-string seeded sample (the full 1,200-string evaluation is in docs/privacy.md)."""
    from tunekit.privacy.corpus import generate
    from tunekit.privacy.evaluate import GOALS, score

    rows = generate(100, seed=7)
    assert len({r["lang"] for r in rows}) == 4 and sum(r["kind"] == "negative" for r in rows) == 100
    res = score(rows, redactor)
    for ent, goal in GOALS.items():
        c = res["by"]["all"][ent]
        assert c["recall"] >= min(goal, 0.85) and c["precision"] >= 0.9, (ent, c)
    assert res["by"]["en"]["PERSON"]["recall"] >= 0.9
    assert sum(v["with_a_finding"] for v in res["negatives"].values()) <= 4


def test_corpus_is_seeded_and_spans_point_at_their_values():
    from tunekit.privacy.corpus import generate

    a, b = generate(10, seed=3), generate(10, seed=3)
    assert a == b and a != generate(10, seed=4)
    for row in a:
        for s in row["spans"]:
            assert row["text"][s["start"]:s["end"]] == s["value"]


@pytest.fixture
def pii_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Invoice, contact jan.devries@example.nl, IBAN "
                                                      "NL91ABNA0417164300"},
                          {"role": "assistant", "content": "{\"vendor\": \"ACME\"}"}]},
            {"messages": [{"role": "user", "content": "Nothing personal, total EUR 12.00"},
                          {"role": "assistant", "content": "ok"}]},
            {"prompt": "Call Klaus Becker on +49 30 12345678", "completion": "done"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_scan_and_redact_cli(pii_file, tmp_path, capsys):
    from tunekit.cli import main

    assert main(["data", "scan", str(pii_file)]) == 1  # 1 = personal data found
    out = capsys.readouterr().out
    assert "EMAIL_ADDRESS" in out and f"{pii_file}:1:messages[0].content" in out and f"{pii_file}:3:prompt" in out
    assert "jan.devries@example.nl" not in out and "NL91ABNA0417164300" not in out  # examples are masked
    assert main(["data", "scan", str(pii_file), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"EMAIL_ADDRESS": 1, "IBAN_CODE": 1, "PERSON": 1, "PHONE_NUMBER": 1}
    assert report["records_with_pii"] == 2
    out_file = tmp_path / "clean.jsonl"
    assert main(["data", "redact", str(pii_file), "--out", str(out_file)]) == 0
    text = out_file.read_text()
    assert "<EMAIL>" in text and "<IBAN>" in text and "<PHONE>" in text
    for raw in ("jan.devries", "NL91ABNA", "12345678", "Becker"):
        assert raw not in text
    assert main(["data", "scan", str(out_file)]) == 0
    assert main(["data", "redact", str(pii_file), "--out", str(pii_file)]) == 2  # not over the input


def test_train_pii_policies(pii_file, tmp_path, make_config, monkeypatch):
    from tunekit import api
    from tunekit.config import load_config
    from tunekit.privacy.scan import apply_pii_policy

    monkeypatch.setenv("TUNEKIT_CACHE", str(tmp_path / "cache"))
    assert load_config(None, {"train.pii": False}).train.pii == "off"  # YAML's `off`
    assert load_config(None, {}).train.pii == "warn"
    said = []
    cfg = make_config(tmp_path / "run", {"train.pii": "warn"}, train_file=pii_file)
    assert apply_pii_policy(cfg, said.append) is cfg and "EMAIL_ADDRESS" in said[0]
    assert "jan.devries@example.nl" not in said[0]
    assert (tmp_path / "cache" / "pii-scan").is_dir()  # the scan is cached by content hash
    with pytest.raises(PrivacyError, match="train.pii=refuse"):
        api.train(make_config(tmp_path / "run2", {"train.pii": "refuse"}, train_file=pii_file))
    assert not (tmp_path / "run2" / "adapter_model.safetensors").exists()
    cfg = apply_pii_policy(make_config(tmp_path / "run3", {"train.pii": "redact"}, train_file=pii_file), said.append)
    redacted = cfg.data.train
    assert redacted.endswith("pii-redacted/train.jsonl") and "<EMAIL>" in open(redacted).read()
    off = make_config(tmp_path / "run4", {"train.pii": "off"}, train_file=pii_file)
    assert apply_pii_policy(off, said.append) is off
