"""The README and the pages under docs/ say only what is true of this checkout.

* Every ```python block runs as written, each in a fresh namespace (a block preceded by an HTML
  comment ``<!-- not-run: reason -->`` is only compiled).
* Every ``neuro-mar SUB --flag`` line of a ```bash block names a real subcommand and real options
  of it; every ``make TARGET`` a Makefile target; every script path a file of the repository.
* Every relative link points at a file that exists (and at a heading of it, for ``#anchor``);
  every repository path in backticks exists; no page points at a folder outside the repository.
* The README stays a front door (at most 200 lines).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_FOLDERS = ("benchmarks/", "docs/", "hardware_models/", "kernels/", "neuro_mar/", "scripts/", "tests/")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(page: Path):
    """``(lang, first line number, code, not-run reason or None)`` for each fenced block."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("```"):
            lang, start = line[3:].strip().lower(), i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            assert j < len(lines), f"{_rel(page)}:{i + 1}: code block never closed"
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = NOT_RUN.search(lines[k]) if k >= 0 else None
            out.append((lang, start + 1, "\n".join(lines[start:j]) + "\n", m.group("reason") if m else None))
            i = j + 1
        else:
            i += 1
    return out


def _prose(page: Path) -> str:
    """The page without its fenced blocks (links and paths in code are not links)."""
    return re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M)


PYTHON_BLOCKS = [pytest.param(page, line, code, reason, id=f"{_rel(page)}:{line}")
                 for page in PAGES for lang, line, code, reason in _blocks(page) if lang == "python"]
BASH_BLOCKS = [pytest.param(page, line, code, id=f"{_rel(page)}:{line}")
               for page in PAGES for lang, line, code, _ in _blocks(page) if lang in ("bash", "sh", "shell")]


def test_there_are_snippets():
    readme = [p for p in PYTHON_BLOCKS if p.values[0].name == "README.md" and p.values[0].parent == ROOT]
    assert len(readme) >= 2, "the README's quickstart has a Python and a kernels snippet"
    assert BASH_BLOCKS


@pytest.mark.parametrize("page,line,code,reason", PYTHON_BLOCKS)
def test_python_snippet_runs(page, line, code, reason, tmp_path, monkeypatch):
    compiled = compile(code, f"{_rel(page)}:{line}", "exec")
    if reason is not None:
        assert reason, f"{_rel(page)}:{line}: a not-run block says why"
        return
    if "neuro_mar.kernels" in code and importlib.util.find_spec("triton") is None:
        pytest.skip("the kernels need triton (the [test] extra installs it on Linux x86-64)")
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands in a temporary folder
    exec(compiled, {"__name__": "__main__"})


def _cli_options() -> dict[str, set[str]]:
    from neuro_mar.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


def _commands(code: str):
    """Token lists of the block's command lines (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", code)
    for raw in joined.splitlines():
        lex = shlex.shlex(raw, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            yield raw, list(lex)
        except ValueError as err:  # unbalanced quotes
            raise AssertionError(f"cannot parse {raw!r}: {err}") from None


OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")", "$("}


@pytest.mark.parametrize("page,line,code", BASH_BLOCKS)
def test_bash_snippet_names_real_commands(page, line, code):
    options, targets = _cli_options(), _make_targets()
    problems = []
    for raw, toks in _commands(code):
        for i, tok in enumerate(toks):
            sub_at = None
            if tok == "neuro-mar" or tok.endswith("/neuro-mar"):
                sub_at = i + 1
                if i > 0 and toks[i - 1] == "which":  # $(which neuro-mar) SUB
                    sub_at = i + 2
            elif tok == "-m" and i + 1 < len(toks) and toks[i + 1] == "neuro_mar":
                sub_at = i + 2
            if sub_at is not None:
                sub = toks[sub_at] if sub_at < len(toks) else ""
                if sub in ("-h", "--help"):
                    continue
                if sub not in options:
                    problems.append(f"{raw.strip()!r}: no subcommand {sub!r} (there are {sorted(options)})")
                    continue
                for t in toks[sub_at + 1:]:
                    if t in OPERATORS:
                        break
                    flag = t.split("=", 1)[0]
                    if flag.startswith("--") and flag not in options[sub]:
                        problems.append(f"{raw.strip()!r}: `neuro-mar {sub}` has no option {flag}")
            if tok == "make" and (i == 0 or toks[i - 1] in OPERATORS):
                for t in toks[i + 1:]:
                    if t in OPERATORS:
                        break
                    if "=" not in t and not t.startswith("-") and t not in targets:
                        problems.append(f"{raw.strip()!r}: the Makefile has no target {t!r}")
            if re.fullmatch(r"[\w.-]+(/[\w.-]+)+\.(py|sh)", tok) and not (ROOT / tok).is_file():
                problems.append(f"{raw.strip()!r}: no file {tok}")
    assert not problems, f"{_rel(page)}:{line}:\n" + "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", _prose(page), flags=re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_point_at_files_that_exist(page):
    problems = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{target}: {_rel(dest)} has no heading #{anchor}")
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_repository_paths_exist(page):
    """A path in backticks that starts with a folder of the repository names a real file or folder."""
    problems = []
    for span in CODE_SPAN.findall(_prose(page)):
        for word in span.split():
            word = word.rstrip(",.;:)")
            if word.startswith(REPO_FOLDERS) and not any(c in word for c in "*<>{}$"):
                if not (ROOT / word).exists():
                    problems.append(word)
    assert not problems, f"{_rel(page)} names paths that do not exist: {problems}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_nothing_points_outside_the_repository(page):
    text = page.read_text()
    assert "shared/" not in text, f"{_rel(page)} points at a shared/ folder outside the repository"
    assert not re.search(r"\]\(\.\./\.\./", text), f"{_rel(page)} links above the repository"


def test_readme_is_a_front_door():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, (f"README.md has {n} lines: keep it a front door (<= {README_MAX_LINES}) and "
                                   "move detail into a page under docs/")
    for page in PAGES[1:]:
        assert page.name == "README.md" or page.name in (ROOT / "docs" / "README.md").read_text(), (
            f"docs/README.md (the index) does not list {page.name}")
