"""Markdown and HTML primitives every report section renders with: tables and numbers.
A leaf of ``embcam.report``: the sections import it, it imports none of them."""

from __future__ import annotations

import html


def md_cell(text: str) -> str:
    """One line; ``|`` kept inside the cell; ``<`` and ``>`` backslash-escaped, so a value
    never becomes an HTML tag in a Markdown viewer."""
    text = " ".join(text.splitlines())
    for char in "|<>":
        text = text.replace(char, "\\" + char)
    return text


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(md_cell(c) for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def num(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
