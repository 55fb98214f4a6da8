"""The HTML report: self-contained, and rendered by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from profit_prep.cli import main

BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
EXAMPLES, PER_PAGE = 10, 4  # fewer than the 24 scored rows: sampling and pagination both apply


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (scripts/setup.sh --test installs it)")


def run_browser(tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run with a fresh profile; console messages land on stderr."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [chromium(), *BROWSER_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_messages(stderr: str) -> list[str]:
    """Page console output (errors, uncaught exceptions): the report itself logs nothing."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


class Dom(HTMLParser):
    """The few facts the test needs from a DOM dump, gathered with the standard library."""

    def __init__(self) -> None:
        super().__init__()
        self.root: dict[str, str | None] = {}
        self.body: dict[str, str | None] = {}
        self.examples: list[dict[str, str | None]] = []  # <section class="example"> attributes
        self.masked_in: list[int] = []  # example index of each masked token span
        self.masked_titles: list[str] = []
        self.plot_shapes: dict[str, int] = {}  # figure id -> drawn shapes inside its <svg>
        self._figure: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "html":
            self.root = a
        elif tag == "body":
            self.body = a
        elif tag == "section" and "example" in classes:
            self.examples.append(a)
        elif tag == "span" and classes == ["tok", "masked"]:
            self.masked_in.append(len(self.examples) - 1)
            self.masked_titles.append(a.get("title") or "")
        elif tag == "figure" and "plot" in classes:
            self._figure = a.get("id")
            self.plot_shapes[self._figure or ""] = 0
        elif tag in ("path", "rect", "use") and self._figure is not None:
            self.plot_shapes[self._figure] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None


def parse_dom(text: str) -> Dom:
    dom = Dom()
    dom.feed(text)
    return dom


@pytest.fixture(scope="module")
def report(scored_output: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert (
        main(
            [
                "report",
                str(scored_output),
                "--html",
                str(path),
                "--examples",
                str(EXAMPLES),
                "--per-page",
                str(PER_PAGE),
            ]
        )
        == 0
    )
    return path


@pytest.mark.slow
def test_report_is_self_contained_and_escaped(report: Path) -> None:
    text = report.read_text()
    # Nothing to fetch at view time (SVG namespace URIs are names, not fetches).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<link" not in text and "@import" not in text and "url(http" not in text
    assert text.count("<svg") == 3
    # Token text is escaped: the chat template's special tokens never appear as raw tags.
    assert "<|im_start|>" not in text and "&lt;|im_start|&gt;" in text
    assert f"{EXAMPLES} of 24 examples, a seeded random sample (seed 0)" in text
    assert f"{PER_PAGE} per page" in text
    assert text.count('<section class="example"') == EXAMPLES
    # The same seed gives the same sample.
    from profit_prep.views.report import sample_indices

    assert np.array_equal(sample_indices(24, EXAMPLES, 0), sample_indices(24, EXAMPLES, 0))


@pytest.mark.slow
def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    url = report.resolve().as_uri()
    shot = tmp_path / "report.png"
    run = run_browser(tmp_path, url, f"--screenshot={shot}", "--window-size=1280,2000")
    assert run.returncode == 0, run.stderr[-2000:]
    assert console_messages(run.stderr) == []
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        pixels = np.asarray(img.convert("RGB"))
    assert shot.stat().st_size > 30_000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text, plots, colours: not blank
    assert (pixels.std(axis=(0, 1)) > 10).all()

    run = run_browser(tmp_path, url, "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    assert console_messages(run.stderr) == []
    dom = parse_dom(run.stdout)
    assert dom.body.get("data-ready") == "1"  # the page script ran to its end
    assert "data-js-errors" not in dom.root
    assert dom.body.get("data-page") == "1"
    # Three plots, each drawn (bars, lines, axes are SVG paths).
    assert set(dom.plot_shapes) == {"plot-probability", "plot-sweep", "plot-per-example"}
    assert all(n > 10 for n in dom.plot_shapes.values()), dom.plot_shapes
    # Pagination: the first PER_PAGE examples are visible, the rest hidden.
    visible = [i for i, ex in enumerate(dom.examples) if "hidden" not in ex]
    assert len(dom.examples) == EXAMPLES and visible == list(range(PER_PAGE))
    # A masked token is shown on the visible page, with its probability on hover.
    shown_masked = [
        t for i, t in zip(dom.masked_in, dom.masked_titles, strict=True) if i in visible
    ]
    assert shown_masked
    for title in shown_masked:
        p = float(re.fullmatch(r"p=([\d.]+) · masked", title).group(1))
        assert p < 0.1  # the stored rule: higher, tau = 0.1


@pytest.mark.slow
def test_browser_check_catches_script_errors(report: Path, tmp_path: Path) -> None:
    """The checks above are not vacuous: a broken script shows in the DOM and the console."""
    broken = tmp_path / "broken.html"
    page = report.read_text()
    hook = "render();\n  document.body"
    assert page.count(hook) == 1
    broken.write_text(page.replace(hook, "render(); undefinedFunction();\n  document.body"))
    run = run_browser(tmp_path, broken.resolve().as_uri(), "--dump-dom")
    dom = parse_dom(run.stdout)
    assert "undefinedFunction" in (dom.root.get("data-js-errors") or "")
    assert dom.body.get("data-ready") is None
    assert any("undefinedFunction" in m for m in console_messages(run.stderr))


@pytest.mark.slow
def test_demo_prints_where_its_report_is(
    tmp_path: Path, smollm2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--rows", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"report      {out / 'report.html'}" in lines
    assert "<h1>profit-prep report</h1>" in (out / "report.html").read_text()


# -- --color-by and --compare: the token view carries the chosen column --------------------------


class Tokens(HTMLParser):
    """Each example's response-token spans: classes, tooltip, data-v and text."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, dict[str, str | None]] = {}  # example id -> section attributes
        self.tokens: dict[str, list[dict[str, object]]] = {}
        self._current: str | None = None
        self._span: dict[str, object] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "section" and "example" in classes:
            self._current = (a.get("id") or "").removeprefix("ex-")
            self.examples[self._current] = a
            self.tokens[self._current] = []
        elif tag == "span" and "tok" in classes and self._current is not None:
            self._span = {
                "classes": classes,
                "title": a.get("title"),
                "v": a.get("data-v"),
                "text": "",
            }
            self.tokens[self._current].append(self._span)

    def handle_data(self, data: str) -> None:
        if self._span is not None:
            self._span["text"] = str(self._span["text"]) + data

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._span = None


@pytest.fixture(scope="module")
def signals_out(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """8 GSM8K rows scored by the tiny Llama with every signal; tau = 2e-5 keeps about half."""
    from tests.conftest import score_demo

    return score_demo(
        tmp_path_factory.mktemp("sig") / "out",
        tiny_model_dir,
        signals="entropy,top1,rank",
        tau=2e-5,
    )


def stored_rows(out: Path) -> list[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    rows = []
    for f in sorted((out / "data").glob("part-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows.append({k: np.asarray(v) if isinstance(v, list) else v for k, v in r.items()})
    return rows


def report_tokens(out: Path, html_path: Path, *argv: str) -> Tokens:
    assert main(["report", str(out), "--html", str(html_path), *argv]) == 0
    page = Tokens()
    page.feed(html_path.read_text())
    return page


def test_report_color_by_carries_the_column_and_every_signal(
    signals_out: Path, tmp_path: Path, smollm2_tokenizer
) -> None:
    rows = stored_rows(signals_out)
    resp_all = [r["response_mask"].astype(bool) for r in rows]
    pool = np.concatenate([r["entropy"][m] for r, m in zip(rows, resp_all, strict=True)])
    edges = np.unique(np.quantile(pool.astype(np.float64), np.linspace(0, 1, 6)))
    assert len(edges) == 6  # five buckets: class q<b> is bucket b

    page = report_tokens(signals_out, tmp_path / "r.html", "--color-by", "entropy")
    assert set(page.tokens) == {r["example_id"] for r in rows}
    for r, resp in zip(rows, resp_all, strict=True):
        spans = page.tokens[r["example_id"]]
        assert len(spans) == int(resp.sum())  # one span per response token, prompt runs merged
        entropy = r["entropy"][resp].astype(np.float64)
        assert [s["v"] for s in spans] == [f"{v:.4g}" for v in entropy]
        buckets = np.digitize(entropy, edges[1:-1])
        assert [next(c for c in s["classes"] if re.fullmatch(r"q\d", c)) for s in spans] == [
            f"q{b}" for b in buckets
        ]
        masked = resp & ~r["loss_mask"].astype(bool)
        assert ["masked" in s["classes"] for s in spans] == masked[resp].tolist()
        p = np.exp(r["logprobs"][resp].astype(np.float64))
        for s, pv, e, rk, t1, t1_id in zip(
            spans,
            p,
            entropy,
            r["rank"][resp],
            r["top1_logprob"][resp],
            r["top1_id"][resp],
            strict=True,
        ):
            parts = str(s["title"]).split(" · ")
            assert parts[0] == f"p={pv:.4f}"
            assert f"entropy={e:.4g}" in parts and f"rank={rk}" in parts
            assert f"top1_logprob={float(t1):.4g}" in parts
            assert parts[-1] == f"top-1: {smollm2_tokenizer.decode([int(t1_id)])!r}"
    text = (tmp_path / "r.html").read_text()
    assert 'id="colour-by">entropy</code>' in text
    for b in range(5):  # the legend shows each bucket's edges
        assert f'<span class="tok q{b}">{edges[b]:.4g}–{edges[b + 1]:.4g}</span>' in text


def test_report_compare_marks_categories(signals_out: Path, tmp_path: Path) -> None:
    rows = stored_rows(signals_out)
    page = report_tokens(
        signals_out,
        tmp_path / "c.html",
        "--compare",
        "stored",
        "top:signal=entropy,fraction=0.5",
        "--examples",
        "5",
    )
    assert len(page.tokens) == 5
    names = ["both", "a-only", "b-only", "neither"]
    seen = set()
    for r in rows:
        if r["example_id"] not in page.tokens:
            continue
        resp = r["response_mask"].astype(bool)
        a = r["loss_mask"].astype(bool)[resp]
        # B: per example, the ceil(50%) response tokens of highest entropy (ties: earlier first)
        ent = r["entropy"][resp].astype(np.float64)
        b = np.zeros(len(ent), dtype=bool)
        b[np.argsort(-ent, kind="stable")[: int(np.ceil(0.5 * len(ent)))]] = True
        cat = np.select([a & b, a & ~b, ~a & b], [0, 1, 2], 3)
        spans = page.tokens[r["example_id"]]
        classes = ["cmp-both", "cmp-a", "cmp-b", "cmp-none"]
        assert [next(c for c in s["classes"] if c.startswith("cmp-")) for s in spans] == [
            classes[c] for c in cat
        ]
        section = page.examples[r["example_id"]]
        assert [int(section[f"data-{n}"] or -1) for n in names] == [
            int((cat == c).sum()) for c in range(4)
        ]
        seen.update(cat.tolist())
    assert seen == {0, 1, 2, 3}


def test_report_refuses_an_unknown_column(
    signals_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["report", str(signals_out), "--html", str(tmp_path / "x.html"), "--color-by", "loss_mask"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        f"error: no per-token column 'loss_mask' in {signals_out}; choose from: prob, "
        "logprobs, entropy, rank, top1_logprob"
    ]
    assert not (tmp_path / "x.html").exists()


def test_report_shows_control_characters_from_the_data_escaped(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Terminal control sequences and bidi controls in tokens, example ids and the manifest's
    model name never appear raw in the page: they show as visible escapes, HTML-escaped."""
    import html

    from tests.test_views import (
        CONTROL_KINDS,
        EVIL_MODEL,
        RAW_CONTROL,
        escaped,
        score_controls,
    )

    out = score_controls(tmp_path / "out", tiny_model_dir)
    path = tmp_path / "r.html"
    assert main(["report", str(out), "--html", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert not RAW_CONTROL.search(text), RAW_CONTROL.search(text)
    assert "\u2028" not in text and "\u2029" not in text
    for kind, (raw, shown) in CONTROL_KINDS.items():
        assert f"example {html.escape(f'id-{kind}-{shown}')} " in text, kind
        for char in filter(lambda c: not c.isprintable(), raw):  # token texts, escaped
            assert text.count(escaped(char)) >= 3, (kind, escaped(char))
    assert html.escape("".join(escaped(c) if c in "\x1b\x07\u202e" else c for c in EVIL_MODEL)) \
        in text
