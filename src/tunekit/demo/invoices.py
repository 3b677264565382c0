"""Demo task: short business emails about invoices -> one JSON record with a fixed schema.

Texts are supplier invoice emails, payment reminders and purchase confirmations with varied tone,
fact order, greetings, signatures and distractor numbers (phone, PO, customer number, IBAN, an earlier
payment). Every target value is copied from the text, with two light normalisations a small model
can learn: dates ("14 March 2024" or ISO) -> "YYYY-MM-DD", amounts ("€1,234.50", "EUR 1,234.50",
"1,234.50 EUR") -> currency code + number. Generation is pure stdlib and seeded, so a split is
identical on every machine.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = (
    "Extract the invoice fields as JSON with keys vendor, invoice_id, date, due_date, currency, total."
)
FIELDS = ("vendor", "invoice_id", "date", "due_date", "currency", "total")
CURRENCY_SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£", "CHF": None}  # CHF is always written as code
AMOUNT_STYLES = ("symbol", "code_before", "code_after")
DATE_STYLES = ("iso", "long")
MONTHS = ("January February March April May June July August September October November "
          "December").split()

# Name pools are combined part by part: ~40*30*8 vendors and ~1600 people, too many to memorise.
_VENDOR_HEADS = ("Northwind Bluefield Harbor Alpine Kestrel Meridian Oakridge Silverline Redstone "
                 "Greenway Brightwater Ironbridge Lakeside Summit Clearview Foxglove Highmoor Westbrook "
                 "Eastgate Stonefield Pinecrest Riverside Copperleaf Maplewood Sunfield Blackwell "
                 "Fairhaven Goldcrest Hollybrook Larkspur Millbrook Newhaven Orchard Quayside Rosewood "
                 "Thornbury Valemont Whitecliff Yarrow Zenith").split()
_VENDOR_TRADES = ("Logistics|Foods|Office Supply|Print Works|Textiles|Engineering|Software|Packaging|"
                  "Electrical|Consulting|Catering|Cleaning Services|Hardware|Timber|Labs|Freight|"
                  "Media|Plastics|Analytics|Furniture|Coffee Roasters|Tools|Metals|Design Studio|"
                  "Security|Events|Paper Mill|Solar|Water Systems|Chemicals").split("|")
_LEGAL_FORMS = ("GmbH", "Ltd", "Inc.", "AG", "LLC", "S.A.", "B.V.", "& Co.")
_FIRST = ("Anna Ben Clara David Emma Felix Grace Henry Ines James Katrin Liam Maria Noah Olivia Paul "
          "Rita Samuel Tara Victor Wendy Yusuf Zoe Lukas Sofia Daniel Hannah Marco Priya Tom Elena "
          "Omar Julia Peter Nina Ravi Laura Chris Mei Jonas").split()
_LAST = ("Keller Smith Novak Brown Rossi Weber Jensen Garcia Muller Okafor Dubois Patel Hughes Larsen "
         "Schmidt Evans Moreau Fischer Costa Nakamura Walsh Becker Silva Turner Khan Bauer Martin "
         "Wright Lopez Meyer Clarke Vogel Ahmed Fontaine Hall Berg Russo Price Ward Kim").split()
_ITEM_ADJ = ("Ergonomic Steel Recycled Wireless Compact Heavy-duty Premium Standard Large Portable "
             "Organic Industrial").split()
_ITEM_NOUN = ("Office Chair|Desk Lamp|Printer Paper|Toner Cartridge|Shelving Unit|Coffee Beans|"
              "Safety Gloves|Cable Set|Storage Box|Whiteboard|Monitor Stand|Label Roll|Work Bench|"
              "Cleaning Kit|Extension Lead").split("|")
_TITLES = ("Accounts Receivable", "Billing Team", "Finance Department", "Customer Service",
           "Credit Control", "Sales")


def format_amount(value: float, currency: str, style: str) -> str:
    """Write an amount the way the texts do; "symbol" falls back to "code_before" for CHF."""
    number = f"{value:,.2f}"
    symbol = CURRENCY_SYMBOLS[currency]
    if style == "symbol" and symbol:
        return symbol + number
    if style == "code_after":
        return f"{number} {currency}"
    return f"{currency} {number}"


def format_date(day: dt.date, style: str) -> str:
    return day.isoformat() if style == "iso" else f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_FIRST), rng.choice(_LAST)


def _vendor(rng: random.Random) -> str:
    name = f"{rng.choice(_VENDOR_HEADS)} {rng.choice(_VENDOR_TRADES)}"
    return name if rng.random() < 0.2 else f"{name} {rng.choice(_LEGAL_FORMS)}"


def _invoice_id(rng: random.Random, vendor: str, year: int) -> str:
    n = rng.randint(1, 99999)
    initials = "".join(w[0] for w in vendor.split()[:2]).upper()
    return rng.choice([
        f"INV-{year}-{n % 10000:04d}", f"INV{n:05d}", f"{rng.choice(['RE', 'BL', 'SI', 'FAC'])}-{n:05d}",
        f"{initials}{year % 100}-{n % 10000:04d}", f"{year}/{n % 10000:04d}",
    ])


def _total(rng: random.Random) -> float:
    value = 10 ** rng.uniform(1.2, 4.4)  # log-uniform, roughly 16 to 25,000
    return float(round(value)) if rng.random() < 0.15 else round(value, 2)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


def _distractors(rng: random.Random, f: dict) -> list[str]:
    """Sentences with numbers that are NOT target values (phone, PO, account, IBAN, old payment)."""
    phone = f"+{rng.choice(['44 20', '49 30', '1 212', '41 44', '33 1'])} {_digits(rng, 3)} {_digits(rng, 4)}"
    old = format_amount(_total(rng), f["currency"], f["style"])
    options = [
        f"For any questions, call us on {phone}.",
        f"This relates to your purchase order PO-{_digits(rng, 5)}.",
        f"Your customer number is {_digits(rng, 6)}.",
        f"Bank details: IBAN DE{_digits(rng, 2)} {_digits(rng, 4)} {_digits(rng, 4)} {_digits(rng, 4)}.",
        f"Your previous payment of {old} has been received, thank you.",
        f"Please quote reference {rng.randint(100, 999)}-{_digits(rng, 3)} on your transfer.",
    ]
    return rng.sample(options, rng.choice([0, 1, 1, 2, 2, 3]))


_FILLERS = ("We really value working with you.", "Please keep this email for your records.",
            "Our office will be closed on public holidays.", "We have recently updated our online portal.",
            "Our team is happy to help with any questions about this document.",
            "As always, we appreciate your trust in our services.")


def _items(rng: random.Random) -> str:
    parts = [f"{rng.randint(1, 12)} x {rng.choice(_ITEM_ADJ)} {rng.choice(_ITEM_NOUN)}"
             for _ in range(rng.randint(1, 3))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _invoice_email(rng: random.Random, f: dict) -> tuple[str, list[str]]:
    opener = rng.choice(["I hope you are well.", "Thank you for your continued business.",
                         "Following our recent delivery, here is the paperwork.", "Quick note from billing."])
    facts = [rng.choice([
        "Please find attached invoice {id} dated {date}.", "Attached is our invoice {id}, issued on {date}.",
        "Our invoice number is {id}. Invoice date: {date}.", "We have issued invoice {id} on {date}.",
    ]), rng.choice([
        "The total amount is {amount}.", "Total due: {amount}.",
        "The amount payable comes to {amount}, including VAT.", "This brings the total to {amount}.",
    ])]
    if f["due"]:
        facts.append(rng.choice(["Payment is due by {due}.", "Please settle the balance by {due}.",
                                 "Due date: {due}.", "Kindly transfer the amount no later than {due}."]))
    else:
        facts.append(rng.choice(["Payment terms are as agreed in our contract.",
                                 "Please pay according to our usual terms."]))
    return opener, facts


def _reminder(rng: random.Random, f: dict) -> tuple[str, list[str]]:
    opener = rng.choice(["This is a friendly reminder about an outstanding payment.",
                         "According to our records, the following invoice is still open.",
                         "We have not yet received payment for the invoice below."])
    facts = [rng.choice(["Invoice {id} was issued on {date}.", "It concerns our invoice {id} dated {date}.",
                         "Invoice number: {id} (date: {date})."]),
             rng.choice(["The outstanding amount is {amount}.", "Amount due: {amount}.",
                         "The open balance is {amount}."]),
             rng.choice(["It was due on {due}.", "The payment deadline was {due}.", "Due date was {due}."])]
    return opener, facts


def _purchase_confirmation(rng: random.Random, f: dict) -> tuple[str, list[str]]:
    opener = rng.choice(["Thank you for your order!", "We are happy to confirm your purchase.",
                         "Your order has been confirmed and is being prepared for shipment."])
    facts = [f"You ordered {_items(rng)}.",
             rng.choice(["Your invoice number is {id}.", "Invoice {id} has been issued for this order."]),
             rng.choice(["Invoice date: {date}.", "The invoice is dated {date}."]),
             rng.choice(["Order total: {amount}.", "Total charged: {amount}.", "Grand total: {amount}."])]
    if f["due"]:
        facts.append(rng.choice(["Please pay by {due} via bank transfer.", "Payment is due on {due}."]))
    else:
        facts.append(f"The amount was charged to your card ending in {_digits(rng, 4)}.")
    return opener, facts


_KINDS = {"invoice": (_invoice_email, 0.15), "reminder": (_reminder, 0.0), "purchase": (_purchase_confirmation, 0.5)}


def _signature(rng: random.Random, vendor: str, with_vendor: bool) -> str:
    first, last = _person(rng)
    sign_off = rng.choice(["Best regards,", "Kind regards,", "Many thanks,", "Sincerely,", "Cheers,"])
    if not with_vendor:
        return f"{sign_off}\n{rng.choice([first, f'{first} {last}'])}"
    return rng.choice([f"{sign_off}\n{first} {last}\n{rng.choice(_TITLES)}, {vendor}",
                       f"{sign_off}\n{first} {last}\n{vendor}", f"{sign_off}\nThe team at {vendor}"])


def make_example(rng: random.Random) -> dict:
    """One chat example: the user turn is INSTRUCTION + text, the assistant turn the JSON target."""
    kind = rng.choice(list(_KINDS))
    build, p_no_due = _KINDS[kind]
    vendor = _vendor(rng)
    issued = dt.date(2023, 1, 1) + dt.timedelta(days=rng.randint(0, 3 * 365))
    due = issued + dt.timedelta(days=rng.choice([7, 10, 14, 21, 30, 45, 60]))
    due = None if rng.random() < p_no_due else due
    currency = rng.choice(list(CURRENCY_SYMBOLS))
    total = _total(rng)
    f = {"id": _invoice_id(rng, vendor, issued.year), "currency": currency, "due": due,
         "style": rng.choice(AMOUNT_STYLES)}
    date_style = rng.choice(DATE_STYLES)
    values = {"id": f["id"], "date": format_date(issued, date_style),
              "due": format_date(due, date_style) if due else "",
              "amount": format_amount(total, currency, f["style"])}

    opener, facts = build(rng, f)
    facts = [s.format(**values) for s in facts] + _distractors(rng, f)
    facts += rng.sample(_FILLERS, rng.choice([1, 1, 2]))
    rng.shuffle(facts)
    vendor_in_body = rng.random() < 0.5
    if vendor_in_body:
        intro = rng.choice(["This is {p} from {v}.", "{v} thanks you for your business.",
                            "I am writing on behalf of {v}."])
        opener = intro.format(p=" ".join(_person(rng)), v=vendor) + " " + opener
    first, last = _person(rng)
    greeting = rng.choice([f"Dear {first} {last},", f"Hi {first},", "Hello,", "Dear Sir or Madam,",
                           f"Good morning {first},", f"Dear Ms {last},", f"Dear Mr {last},"])
    closing = rng.choice(["Let us know if anything is unclear.", "Have a great week.",
                          "We appreciate your prompt attention." if kind == "reminder" else
                          "Thank you for choosing us."])
    signature = _signature(rng, vendor, with_vendor=not vendor_in_body or rng.random() < 0.5)
    text = f"{greeting}\n\n{opener} {' '.join(facts)}\n\n{closing}\n\n{signature}"

    target = {"vendor": vendor, "invoice_id": f["id"], "date": issued.isoformat(),
              "due_date": due.isoformat() if due else None, "currency": currency, "total": total}
    return {"messages": [{"role": "user", "content": INSTRUCTION + "\n\n" + text},
                         {"role": "assistant", "content": json.dumps(target, ensure_ascii=False)}],
            "target": target}


def generate_split(n: int, seed: int) -> list[dict]:
    """`n` examples from `random.Random(seed)`; the same seed gives the same list everywhere."""
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def write_demo_dataset(out_dir: str | Path, n_train: int = 1200, n_test: int = 100,
                       seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl and test.jsonl (one {"messages": [...]} per line, gold answer included).

    Train uses seed 2*seed and test 2*seed+1, so the seeds never collide; any test example whose
    text also occurs in train is skipped and replaced, so the splits share no text.
    """
    train = generate_split(n_train, 2 * seed)
    seen = {ex["messages"][0]["content"] for ex in train}
    rng, test = random.Random(2 * seed + 1), []
    while len(test) < n_test:
        ex = make_example(rng)
        if ex["messages"][0]["content"] not in seen:
            seen.add(ex["messages"][0]["content"])
            test.append(ex)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    for name, rows in (("train", train), ("test", test)):
        with paths[name].open("w", encoding="utf-8") as fh:
            for ex in rows:
                fh.write(json.dumps({"messages": ex["messages"]}, ensure_ascii=False) + "\n")
    return paths
