"""Small documents of every supported kind, written by the tests themselves (a PDF by hand, a docx by python-docx)."""

from __future__ import annotations

from pathlib import Path


def tiny_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page (what pypdf extracts back)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode('latin-1')}\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def encrypted_pdf(path: Path) -> None:
    from pypdf import PdfReader, PdfWriter
    import io

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(tiny_pdf(["secret text"]))))
    writer.encrypt(user_password="pw", owner_password="pw", algorithm="RC4-128")
    with open(path, "wb") as f:
        writer.write(f)


def tiny_docx(path: Path) -> None:
    import docx

    d = docx.Document()
    d.add_heading("Travel policy", level=1)
    d.add_paragraph("Trains are booked in second class.")
    d.add_heading("Hotels", level=2)
    d.add_paragraph("Hotel nights are refunded up to 140 EUR.")
    d.save(path)


POLICY_MD = """# Warranty

Every laptop comes with a warranty of 24 months from the date of delivery.

## Returns

Unused products can be returned within 30 days for a full refund.

# Support

The support desk answers at support@example.com, Monday to Friday.
"""

PRICES_HTML = """<html><head><title>Price list</title><style>p {color: red}</style></head><body>
<h1>Price list</h1><p>The X200 laptop costs 999 EUR.</p><h2>Accessories</h2><p>The docking station costs 149 EUR.</p>
<script>var tracking = "do not index me";</script></body></html>"""


def write_corpus(folder: Path) -> Path:
    """policy.md, prices.html, travel.docx, manual.pdf (2 pages), notes.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.md").write_text(POLICY_MD)
    (folder / "prices.html").write_text(PRICES_HTML)
    tiny_docx(folder / "travel.docx")
    (folder / "manual.pdf").write_bytes(tiny_pdf(["Press the power button for five seconds to reset.",
                                                  "The battery lasts eleven hours."]))
    (folder / "notes.txt").write_text("The office is closed on public holidays.\n\nParking is free for visitors.")
    return folder
