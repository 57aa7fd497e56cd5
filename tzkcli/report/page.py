"""A self-contained HTML page: inline CSS, images embedded as ``data:`` URIs, no scripts.

The page needs nothing but itself: it opens from a file, a mail attachment or a web server
alike, and loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 1.5rem 2rem 4rem; color: #1b1b1b; background: #fff;
       line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem;
     margin-top: 2.2rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 0.4rem; }
p.lead { color: #555; margin-top: 0; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left;
         vertical-align: top; }
th { background: #f4f4f4; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.good { color: #11651b; }
td.bad { color: #9d1c1c; }
figure { margin: 0.6rem 1.2rem 1rem 0; display: inline-block; vertical-align: top; }
figcaption { font-size: 0.85rem; color: #444; max-width: 520px; }
img { image-rendering: pixelated; border: 1px solid #eee; max-width: 100%; }
img.plot { image-rendering: auto; border: none; }
code { background: #f4f4f4; padding: 0 0.2rem; }
.note { color: #555; font-size: 0.9rem; }
"""


@dataclass
class Cell:
    """A table cell: ``text``; ``number`` cells are right-aligned; ``tone`` good/bad colours."""

    text: str
    number: bool = False
    tone: str | None = None


def cell(value: object, digits: int = 4, tone: str | None = None) -> Cell:
    """A cell for a number (formatted to ``digits``), an int (thousands), or text."""
    if isinstance(value, bool) or value is None:
        return Cell("" if value is None else str(value))
    if isinstance(value, int):
        return Cell(f"{value:,}", number=True, tone=tone)
    if isinstance(value, float):
        return Cell(f"{value:.{digits}f}", number=True, tone=tone)
    return Cell(str(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell | object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            item = value if isinstance(value, Cell) else cell(value)
            classes = " ".join(c for c in ("n" if item.number else "", item.tone or "") if c)
            attribute = f' class="{classes}"' if classes else ""
            cells.append(f"<td{attribute}>{html.escape(item.text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_width(png: bytes) -> int:
    """The width in pixels of a PNG, from its IHDR chunk."""
    return int.from_bytes(png[16:20], "big")


def image(png: bytes, alt: str, caption: str | None = None, plot: bool = False,
          width: int | None = None) -> str:
    """A figure with the PNG embedded as a ``data:`` URI, ``width`` CSS pixels wide."""
    source = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    classes = ' class="plot"' if plot else ""
    size = f' width="{width}"' if width else ""
    tag = f'<img src="{source}" alt="{html.escape(alt)}"{classes}{size}>'
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure>{tag}{text}</figure>"


def paragraph(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{html.escape(text)}</p>'


@dataclass
class Section:
    """One ``<h2>`` section of the page, its id for the navigation bar, and its HTML parts."""

    key: str
    title: str
    parts: list[str] = field(default_factory=list)

    def add(self, *parts: str) -> Section:
        self.parts.extend(parts)
        return self

    def heading(self, text: str) -> Section:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")
        return self


def render(title: str, lead: str, sections: Sequence[Section]) -> str:
    """The whole page as one string."""
    links = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>\n' + "\n".join(s.parts)
        + "</section>" for s in sections
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"lead\">{html.escape(lead)}</p>\n"
        f"<nav>{links}</nav>\n{body}\n</body>\n</html>\n"
    )
