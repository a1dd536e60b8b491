"""The comparison page (``GET /``) in headless Chromium: for a sample question it renders the retriever's top-k,
the aligned reranker's top-k and both readers' answers (checked in the DOM and in the screenshot's pixels)."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dpa_rag.reranker.model import load_reranker_model  # noqa: E402
from dpa_rag.retrieval.index import IndexConfig, build_index  # noqa: E402
from dpa_rag.sample import sample_path  # noqa: E402
from dpa_rag.serve import ServeConfig, ServerThread, build_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
QUESTION = "who was the first person to walk on the moon"
TOP_K = 3
# panel header colours in page.html: retriever, reranker, readers
PANEL_COLOURS = {"retriever": (0x09, 0x69, 0xDA), "reranker": (0x1A, 0x7F, 0x37), "readers": (0x82, 0x50, 0xDF)}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'profile'}", "--window-size=1400,900", "--virtual-time-budget=15000", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page_url(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    rr = tmp_path_factory.mktemp("reranker")
    torch.manual_seed(0)
    model, tok = load_reranker_model(str(tiny_bert_dir), "single")
    model.save_pretrained(rr)
    tok.save_pretrained(rr)
    index = tmp_path_factory.mktemp("index")
    build_index(IndexConfig(corpus=[sample_path("corpus.jsonl")], out_dir=index, kind="bm25", progress=False))
    cfg = ServeConfig(index=index, reranker=str(rr), backend="fake", use_cache=False, dtype="float32",
                      reranker_max_length=128, cache_dir=tmp_path_factory.mktemp("cache"),
                      questions=sample_path("questions.jsonl"))
    with ServerThread(build_app(cfg)) as url:
        yield f"{url}/?q={urllib.parse.quote(QUESTION)}"


def test_page_renders_three_panels_in_chromium(page_url: str, tmp_path: Path):
    dom = _chromium(tmp_path, "--dump-dom", page_url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-state="done"' in html, html[-3000:]
    for panel in PANEL_COLOURS:
        section = re.search(rf'<section id="{panel}"[^>]*>', html).group(0)
        assert "hidden" not in section, section
    assert html.count("<li>") == 2 * TOP_K  # the retriever's and the reranker's top-k
    assert re.search(r'id="base-answer">[^<]+<', html) and re.search(r'id="full-answer">[^<]+<', html)
    # the gold answer of a sample question, each reader marked right or wrong, numbers labelled, no server paths
    assert re.search(r'id="gold">Gold answer \(evaluation set\): Neil Armstrong / Armstrong<', html), html[-3000:]
    assert re.search(r'id="base-verdict" class="verdict (right|wrong)">', html)
    assert re.search(r'id="full-verdict" class="verdict (right|wrong)">', html)
    assert html.count('class="score">retriever ') == TOP_K and html.count('class="score">reranker ') == TOP_K
    assert "/tmp" not in html and str(Path.home()) not in html
    samples = re.search(r'<div id="samples">(.*?)</div>', html, re.S)
    assert samples and samples.group(1).count("<button") >= 3, html[-3000:]

    shot = tmp_path / "page.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", page_url)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    if os.environ.get("DPA_RAG_KEEP_SCREENSHOT"):
        img.save(os.environ["DPA_RAG_KEEP_SCREENSHOT"])
    assert img.size == (1400, 900)
    counts = {name: 0 for name in PANEL_COLOURS}
    for n, colour in img.getcolors(maxcolors=1 << 20) or []:
        for name, ref in PANEL_COLOURS.items():
            if all(abs(a - b) <= 6 for a, b in zip(colour, ref, strict=True)):
                counts[name] += n
    # each panel's coloured header (about 440 x 40 px) is on screen
    assert all(c > 5000 for c in counts.values()), counts
