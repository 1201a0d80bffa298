"""HTML → plain text for the prose domain, using only the stdlib ``html.parser``.

Tuned for Sphinx output (the CPython docs) but works on any reasonably formed HTML:

* If the page has an element with ``role="main"`` (Sphinx's ``div.body``), only text inside it is
  kept, which drops the header/footer navigation, the "Table of Contents" sidebar and the search
  box in one go.
* ``script``/``style``/``head``/``nav``/``form`` elements, Sphinx sidebars, "related" navigation
  bars, footers and the ``¶`` permalink anchors are always dropped.
* Headings, paragraphs, list items, table rows and definition terms become separate blocks with
  collapsed whitespace; ``<pre>`` blocks (code examples) keep their whitespace verbatim.
"""

from __future__ import annotations

import html.parser
import re

__all__ = ["html_to_text"]

_VOID = frozenset(
    "area base br col embed hr img input link meta param source track wbr".split()
)
_SKIP_TAGS = frozenset(
    "script style head nav form noscript template svg button select textarea iframe".split()
)
_SKIP_CLASSES = frozenset(
    "sphinxsidebar sphinxsidebarwrapper related footer mobile-nav menu-wrapper inline-search "
    "headerlink toctree-wrapper version_switcher_placeholder language_switcher_placeholder "
    "clearer".split()
)
_BLOCK_TAGS = frozenset(
    "p div section article main aside header footer h1 h2 h3 h4 h5 h6 li ul ol dl dt dd table "
    "thead tbody tfoot tr blockquote figure figcaption caption hr br body html".split()
)
_WS = re.compile(r"\s+")


class _Extractor(html.parser.HTMLParser):
    """Streaming extractor; see the module docstring for the rules."""

    def __init__(self, *, main_only: bool) -> None:
        super().__init__(convert_charrefs=True)
        self._main_only = main_only
        self._main_depth = 0  # >0 while inside the role="main" element (counting same-name tags)
        self._main_tag: str | None = None
        self._skip_depth = 0  # >0 while inside a dropped element
        self._skip_tag: str | None = None
        self._pre_depth = 0
        self._inline: list[str] = []
        self._pre: list[str] = []
        self._bullet = False  # a list item started and has not produced text yet
        self.blocks: list[str] = []

    # -- helpers ---------------------------------------------------------------------------
    def _active(self) -> bool:
        return self._skip_depth == 0 and (not self._main_only or self._main_depth > 0)

    def _flush_inline(self) -> None:
        text = _WS.sub(" ", "".join(self._inline)).strip()
        self._inline.clear()
        if text:
            self.blocks.append(f"- {text}" if self._bullet else text)
            self._bullet = False

    # -- HTMLParser hooks -------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Track skip/main regions and block boundaries."""
        if tag in _VOID:
            if tag in ("br", "hr") and self._active():
                if self._pre_depth:
                    self._pre.append("\n")
                else:
                    self._flush_inline()
            return
        if self._skip_depth:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or attr.get("role") == "navigation":
            self._skip_tag, self._skip_depth = tag, 1
            return
        if self._main_depth:
            if tag == self._main_tag:
                self._main_depth += 1
        elif self._main_only and attr.get("role") == "main":
            self._main_tag, self._main_depth = tag, 1
        if not self._active():
            return
        if tag == "pre":
            if self._pre_depth == 0:
                self._flush_inline()
            self._pre_depth += 1
        elif tag in _BLOCK_TAGS and not self._pre_depth:
            self._flush_inline()
            if tag == "li":
                self._bullet = True
        elif tag in ("td", "th") and self._inline:
            self._inline.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        """Close skip/main regions and emit finished blocks."""
        if tag in _VOID:
            return
        if self._skip_depth:
            if tag == self._skip_tag:
                self._skip_depth -= 1
            return
        was_active = self._active()
        if self._main_depth and tag == self._main_tag:
            self._main_depth -= 1
        if not was_active:
            return
        if tag == "pre" and self._pre_depth:
            self._pre_depth -= 1
            if self._pre_depth == 0:
                text = "".join(self._pre).strip("\n").rstrip()
                self._pre.clear()
                if text.strip():
                    self.blocks.append(text)
        elif tag in _BLOCK_TAGS and not self._pre_depth:
            self._flush_inline()

    def handle_data(self, data: str) -> None:
        """Collect text of active regions."""
        if not self._active():
            return
        (self._pre if self._pre_depth else self._inline).append(data)

    def close(self) -> None:
        """Finish parsing and flush pending text."""
        super().close()
        if self._pre:
            text = "".join(self._pre).strip("\n").rstrip()
            self._pre.clear()
            if text.strip():
                self.blocks.append(text)
        self._flush_inline()


def html_to_text(source: str) -> str:
    """Convert an HTML document to plain text (blocks separated by a blank line).

    Args:
        source: the HTML document as a string.

    Returns:
        The extracted text; empty if the page has no visible content. Character references are
        decoded; code blocks keep their exact whitespace.
    """
    main_only = re.search(r"""role\s*=\s*["']?main\b""", source) is not None
    parser = _Extractor(main_only=main_only)
    parser.feed(source)
    parser.close()
    return "\n\n".join(parser.blocks)
