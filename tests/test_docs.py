"""README.md and docs/: every relative link names a file that exists and, after '#', one of its headings."""
import glob
import os
import re

import pytest

from conftest import ROOT

PAGES = ["README.md", "filelists/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_slug_follows_githubs_rule():
    assert slug("APCodec-S: the causal, streaming codec") == "apcodec-s-the-causal-streaming-codec"
    assert slug("Codes file format (version 1)") == "codes-file-format-version-1"
    assert slug("Where this differs from the release's code (same numbers)") == \
        "where-this-differs-from-the-releases-code-same-numbers"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    path = os.path.join(ROOT, page)
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(linked):
            broken.append(f"{target} (no such file)")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page}: broken links: {', '.join(broken)}"


def test_codes_file_table_is_the_header_the_code_writes():
    """docs/inference.md's byte table, computed here from codec.HEADER_FIELDS."""
    import struct

    from codec import FORMAT_VERSION, HEADER_FIELDS
    types = {"4s": "4 bytes", "16s": "16 bytes", "H": "uint16", "I": "uint32", "Q": "uint64"}
    rows, start = [], 0
    for name, code, meaning in HEADER_FIELDS:
        size = struct.calcsize("<" + code)
        rows.append(f"| {start}–{start + size - 1} | `{name}` | {types[code]} | {meaning} |")
        start += size
    with open(os.path.join(ROOT, "docs", "inference.md"), encoding="utf-8") as f:
        text = f.read()
    assert f"## Codes file format (version {FORMAT_VERSION})" in text
    assert f"A {start}-byte little-endian header" in text
    assert "\n".join(rows) in text
