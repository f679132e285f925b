"""Read a report back as a person would: its tables and sentences from the HTML and from the Markdown, with the
numbers parsed out of the text, so tests compare what the report says with what the metrics files hold."""
from __future__ import annotations

import re
from html.parser import HTMLParser

# "12.34% [5.6, 20.1] (n=100)": an accuracy with its interval and number of points, as the report prints them
FIGURE = re.compile(r"(?P<acc>\d+\.\d+)% \[(?P<lo>\d+\.\d+), (?P<hi>\d+\.\d+)\] \(n=(?P<n>\d+)\)")
# a comparison sentence: "<a> beat | did worse than | did not measurably beat <b> on this run ...", on the headline,
# with what the strict rule says where it disagrees
COMPARISON = re.compile(
    r"(?P<a>.+?) (?P<verdict>beat|did worse than|did not measurably beat) (?P<b>.+?) on this run"
    r"(?:, by |: difference )(?P<d>[+-]\d+\.\d) points \((?P<level>[\d.]+)% paired interval "
    r"\[(?P<lo>[+-]\d+\.\d), (?P<hi>[+-]\d+\.\d)\] points, sign-flip test p (?:<|=) [\d.e-]+\)\. Expected robust "
    r"accuracy under the strongest attack found for each point, on the same first (?P<n>\d+) test points: "
    r"(?P=a) (?P<acc_a>\d+\.\d+)%, (?P=b) (?P<acc_b>\d+\.\d+)% \((?P=a) more likely correct on (?P<more_a>\d+) "
    r"points, (?P=b) on (?P<more_b>\d+)\)\.(?P<strict> The strict rule disagrees on .*)?$")


def figures(cell: str) -> list[dict[str, float]]:
    """Every "acc% [lo, hi] (n=N)" in a table cell, as fractions and a count."""
    return [{"accuracy": float(m["acc"]) / 100, "ci_low": float(m["lo"]) / 100, "ci_high": float(m["hi"]) / 100,
             "n": int(m["n"])} for m in FIGURE.finditer(cell)]


class _Html(HTMLParser):
    """Headings (h2), the tables under each, and the list items under each."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, list]] = {}
        self._heading: str | None = None
        self._text: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("h2", "td", "th", "li"):
            self._text = []
        if tag == "tr":
            self._row = []
        if tag == "table" and self._heading is not None:
            self.sections[self._heading]["tables"].append([])

    def handle_endtag(self, tag: str) -> None:
        text = "".join(self._text or [])
        if tag == "h2":
            self._heading = text
            self.sections[text] = {"tables": [], "items": []}
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(text)
        elif tag == "tr" and self._row is not None:
            self.sections[self._heading]["tables"][-1].append(self._row)
            self._row = None
        elif tag == "li":
            self.sections[self._heading]["items"].append(text)
        if tag in ("h2", "td", "th", "li"):
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def html_sections(page: str) -> dict[str, dict[str, list]]:
    """heading -> {"tables": [rows, ...] (each row a list of cell texts, the header first), "items": [sentences]}."""
    parser = _Html()
    parser.feed(page)
    return parser.sections


def md_sections(text: str) -> dict[str, dict[str, list]]:
    """The same from the Markdown twin (backticks removed, as the HTML shows them)."""
    out: dict[str, dict[str, list]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
            out[heading] = {"tables": [], "items": []}
        elif heading is None:
            continue
        elif line.startswith("| "):
            cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split(" | ")]
            if not out[heading]["tables"] or out[heading].get("_ended"):
                out[heading]["tables"].append([])
                out[heading]["_ended"] = False
            out[heading]["tables"][-1].append(cells)
        elif line.startswith("|---"):
            continue
        elif line.startswith("- "):
            out[heading]["items"].append(line[2:].replace("`", ""))
        elif out[heading]["tables"]:
            out[heading]["_ended"] = True
    for section in out.values():
        section.pop("_ended", None)
    return out
