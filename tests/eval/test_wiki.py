"""wiki.py: markup stripping on hand-made wikitext, and parsing a small bz2 dump."""
import bz2

from tardis_compiler.eval.wiki import read_articles, strip_wiki_markup

from tests.eval.helpers import needs_gensim


def test_templates_links_refs_and_emphasis():
    raw = ("{{Infobox person|name={{nowrap|X}}}}'''Ada''' was a [[mathematician]] and "
           "[[writer|author]].<ref name=a>Cite</ref><ref name=b/> She {{citation needed}}lived.")
    assert strip_wiki_markup(raw) == "Ada was a mathematician and author. She lived."


def test_files_categories_tables_comments_and_external_links_disappear():
    raw = ("Intro text here.\n[[File:Ada.jpg|thumb|Ada, by [[Painter|a painter]]]]\n"
           "{| class=wikitable\n|-\n| cell || {{x}}\n|}\n<!-- hidden -->"
           "See [http://example.org the site] and [http://bare.org].\n[[Category:People]]\n[[de:Ada]]")
    assert strip_wiki_markup(raw) == "Intro text here.\n\nSee the site and ."


def test_headings_become_paragraphs_and_reference_sections_are_cut():
    raw = ("Lead paragraph.\n\n== Life ==\nBorn in London.\n* a list item\n\n"
           "== References ==\n* {{cite book|title=T}}\nTrailing junk.")
    assert strip_wiki_markup(raw) == "Lead paragraph.\n\nLife\n\nBorn in London. a list item"


def _dump(pages: list[tuple[str, str, str]]) -> bytes:
    body = "".join(f"<page><title>{t}</title><ns>{ns}</ns><revision><text>{text}</text>"
                   f"</revision></page>" for t, ns, text in pages)
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    return bz2.compress(xml.encode())


def test_read_articles_skips_redirects_other_namespaces_and_stubs(tmp_path):
    long_text = "Word " * 60
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(_dump([("Keep", "0", long_text), ("Redirect", "0", "#REDIRECT [[Keep]]"),
                            ("Talk:Keep", "1", long_text), ("Stub", "0", "Too short.")]))
    articles = read_articles(path)
    assert [a.title for a in articles] == ["Keep"]
    assert articles[0].text == long_text.strip()


@needs_gensim
def test_the_bundled_extract_reads_as_clean_prose():
    articles = read_articles()
    assert len(articles) >= 100
    text = "\n".join(a.text for a in articles)
    assert len(text) > 2_000_000
    for leftover in ("{{", "}}", "<ref", "[[Category:"):
        assert leftover not in text
