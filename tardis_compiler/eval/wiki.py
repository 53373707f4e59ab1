"""Plain text from the English Wikipedia extract that ships inside gensim (107 pages, offline).

We parse the bz2 XML dump ourselves (bz2 + ``xml.etree.ElementTree.iterparse``) and strip the wiki
markup with a few regular expressions. The goal is readable prose for perplexity, close in spirit
to WikiText: templates, tables, references, files and categories go; link text stays.
"""
from __future__ import annotations

import bz2
import dataclasses
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .packages import package_dir

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Sections that are lists of citations or links, not prose: everything from them on is dropped.
_TRAILING_SECTIONS = ("references", "notes", "footnotes", "see also", "external links",
                      "further reading", "bibliography", "sources", "citations")
# Link namespaces whose target is not text (images, categories, interlanguage links like [[de:X]]).
_NON_TEXT_LINK = re.compile(r"^\s*(file|image|category|media|wikt|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


@dataclasses.dataclass(frozen=True)
class Article:
    """One Wikipedia article: its title and its plain text (paragraphs separated by blank lines)."""

    title: str
    text: str


def wiki_dump_path() -> Path:
    """Path of gensim's bundled Wikipedia dump (raises with the pip command if gensim is absent).

    Example:
        >>> wiki_dump_path().suffix
        '.bz2'
    """
    return package_dir("gensim") / WIKI_FILE


def read_articles(path: str | Path | None = None, *, min_chars: int = 200) -> list[Article]:
    """Articles of a MediaWiki bz2 XML dump as plain text, in file order.

    Redirects, non-article namespaces and articles with less than ``min_chars`` characters of
    text left after markup stripping are skipped.

    Example:
        >>> articles = read_articles()
        >>> articles[0].title, len(articles) > 50
        ('Anarchism', True)
    """
    articles = []
    with bz2.open(path or wiki_dump_path(), "rb") as stream:
        for _, element in ET.iterparse(stream, events=("end",)):
            if _local(element.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in element.iter()}
            title = (fields["title"].text or "") if "title" in fields else ""
            namespace = (fields["ns"].text or "0") if "ns" in fields else "0"
            raw = (fields["text"].text or "") if "text" in fields else ""
            element.clear()  # iterparse keeps the tree otherwise; the dump does not fit in memory
            if namespace != "0" or raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = strip_wiki_markup(raw)
            if len(text) >= min_chars:
                articles.append(Article(title, text))
    return articles


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def strip_wiki_markup(raw: str) -> str:
    """Readable text from wikitext: drop templates, tables, refs, comments, files and categories;
    keep link labels and heading text; cut reference/link sections at the end.

    Example:
        >>> strip_wiki_markup("{{Infobox|x=1}}'''Cats''' are [[mammal|mammals]].<ref>Smith</ref>")
        'Cats are mammals.'
    """
    text = re.sub(r"<!--.*?-->", "", raw, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.I | re.S)
    text = re.sub(r"<(math|gallery|timeline|syntaxhighlight|source|score)[^>]*>.*?</\1>", "", text,
                  flags=re.I | re.S)
    text = _remove_nested(text, "{{", "}}")  # templates, infoboxes
    text = _remove_nested(text, "{|", "|}")  # tables
    text = _resolve_links(text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)  # [http://x label] -> label
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining html tags, keep their content
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words such as __NOTOC__
    text = html.unescape(text)
    return _clean_lines(text)


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Delete balanced ``open_ ... close`` spans, nesting included (regex cannot count)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _resolve_links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target, file/category links -> nothing.

    Innermost links first, repeatedly, so a file caption with links inside it disappears whole.
    """
    innermost = re.compile(r"\[\[([^\[\]]*)\]\]")

    def replace(match: re.Match) -> str:
        body = match.group(1)
        if _NON_TEXT_LINK.match(body):
            return ""
        return body.rsplit("|", 1)[-1]

    while True:
        new = innermost.sub(replace, text)
        if new == text:
            return text
        text = new


def _clean_lines(text: str) -> str:
    paragraphs, current = [], []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in _TRAILING_SECTIONS:
                break
            if current:
                paragraphs.append(" ".join(current))
            paragraphs.append(heading.group(2))  # a heading is a paragraph of its own
            current = []
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left where templates were
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        if not line or line in ("|", "}", "{"):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if p)
