"""The user documentation (README.md and docs/*.md) stands on its own inside the repository.

Someone who clones the repository, or reads it on its host, has nothing outside it: every relative link of the
README and of docs/ must reach a file or folder of the repository (and a heading of it, where the link names one),
and nothing may send the reader to the team's brief beside the repository (`../shared`). Links are read from the
Markdown source, outside code blocks and code spans; anchors are computed from headings the way GitHub makes them.
"""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 10 * 1024  # the README is the front page; the rest belongs in docs/


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (each fenced line becomes empty, so line numbers stay)."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return out


def prose(text: str) -> str:
    """The Markdown outside code blocks, with code spans blanked: what a renderer reads links from."""
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), "\n".join(prose_lines(text)))


def links(text: str) -> list[str]:
    """Every link target of the Markdown: inline links and images, reference definitions, HTML href/src."""
    body = prose(text)
    return [m.group(1) for pattern in (INLINE_LINK, REFERENCE_DEF, HTML_LINK) for m in pattern.finditer(body)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file defines: one per heading (repeats numbered -1, -2, ... as GitHub does) and
    HTML name/id anchors."""
    text = path.read_text(encoding="utf-8")
    found, seen = set(), {}
    for line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found | {m.group(1) for m in HTML_ANCHOR.finditer(text)}


def link_problem(source: Path, target: str, root: Path = ROOT) -> str | None:
    """Why `target`, a link in `source`, does not resolve inside the repository at `root`; None when it does.
    Web links (a scheme other than file:) are not the repository's to check."""
    if not target:
        return "an empty link"
    scheme = SCHEME.match(target)
    if scheme and not target.lower().startswith("file:"):
        return None
    if scheme or target.startswith(("/", "\\")):
        return f"{target!r} is an absolute path: link inside the repository with a relative path"
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part.split("?")[0])
    dest = (source.parent / path_part).resolve() if path_part else source.resolve()
    if dest != root and root not in dest.parents:
        return f"{target!r} points outside the repository ({dest})"
    if not dest.exists():
        return f"{target!r}: {dest.relative_to(root)} does not exist"
    if anchor:
        if dest.is_dir() or dest.suffix.lower() != ".md":
            return f"{target!r}: an anchor into {dest.relative_to(root)}, which is not a Markdown file"
        if unquote(anchor).lower() not in anchors(dest):
            return f"{target!r}: {dest.relative_to(root)} has no heading with the anchor #{anchor}"
    return None


def problems(path: Path, root: Path = ROOT) -> list[str]:
    """Every broken or outward link of one document, and every mention of the brief beside the repository."""
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(root)
    found = [f"{name}: {p}" for t in links(text) if (p := link_problem(path, t, root))]
    for n, line in enumerate(text.splitlines(), 1):
        if re.search(r"\.\./+shared\b", line):
            found.append(f"{name}:{n}: sends the reader to ../shared, outside the repository: {line.strip()!r}")
    for m in CODE_SPAN.finditer("\n".join(prose_lines(text))):
        span = m.group(2).strip()
        if span.startswith("../") and " " not in span:  # a path written out, e.g. `../folder/FILE.md`
            dest = (path.parent / span).resolve()
            if dest != root and root not in dest.parents:
                found.append(f"{name}: the path `{span}` lies outside the repository")
    return found


# -- the checks themselves can fail ----------------------------------------------------------------

def test_link_checker_finds_what_is_wrong(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "api.md").write_text("# The API\n\n## Loading a model\n\n## Loading a model\n")
    readme = root / "README.md"
    readme.write_text(
        "See [api](docs/api.md#loading-a-model), [again](docs/api.md#loading-a-model-1), [home](#top-part) "
        "and [web](https://example.org/x).\n\n# Top part\n\n"
        "```bash\n# not a heading\n[not a link](missing.md)\n```\n"
        "`[not a link either](missing.md)`\n")
    assert problems(readme, root) == []
    readme.write_text(
        "[gone](docs/gone.md) [no heading](docs/api.md#saving) [brief](../shared/API.md) "
        "[abs](/etc/passwd) <a href=\"../outside.md\">x</a>\n\n[ref]: docs/nothing.md\n"
        "The brief is in `../shared/`.\n")
    found = problems(readme, root)
    for expected in ("docs/gone.md does not exist", "no heading with the anchor #saving",
                     "'../shared/API.md' points outside", "'/etc/passwd' is an absolute path",
                     "'../outside.md' points outside", "docs/nothing.md does not exist",
                     "sends the reader to ../shared", "the path `../shared/` lies outside"):
        assert any(expected in p for p in found), (expected, found)


def test_slugs_are_githubs():
    assert slug("Releases: the GPU machine's and the newest") == "releases-the-gpu-machines-and-the-newest"
    assert slug("`p2p.load` and `edit_cache`") == "p2pload-and-edit_cache"
    assert slug("The test suite on the GPU machine's releases (2026-12-02, 2026-12-03)") == \
        "the-test-suite-on-the-gpu-machines-releases-2026-12-02-2026-12-03"


# -- the repository's documents ----------------------------------------------------------------------

@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(path):
    found = problems(path)
    assert not found, "\n".join(found)


def test_every_docs_page_is_linked_from_the_index():
    index = ROOT / "docs" / "index.md"
    assert index.is_file(), "docs/index.md is missing: the documentation needs a page that links its pages"
    linked = {(index.parent / unquote(t.partition("#")[0])).resolve()
              for t in links(index.read_text(encoding="utf-8")) if t and not SCHEME.match(t)}
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p != index and p.resolve() not in linked]
    assert not orphans, f"docs/index.md does not link {orphans}"
    readme = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links((ROOT / "README.md").read_text())}
    assert index.resolve() in readme, "README.md does not link docs/index.md"


def test_readme_is_a_front_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (at most {README_MAX_BYTES})"


def test_readme_set_up_is_what_ci_runs():
    """The README's two set-up commands are the ones .ci/run runs, word for word."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ci[i + 1] for i, line in enumerate(ci) if line.startswith("# The README's")]
    assert len(commands) == 2, commands
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):]
    block = setup[setup.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    assert block.strip().splitlines() == commands, (block, commands)
