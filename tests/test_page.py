"""The page at `/` (issue 28) in a real browser, and the two routes it reads besides SIE's.

Debian's chromium (installed by scripts/setup-apt.sh), driven by PyPI playwright, nothing
downloaded, against real server processes on 127.0.0.1 with the BGE-M3-shaped test model and
all-MiniLM-L6-v2. What the page draws is checked against the server's own answers to the
requests the page made (captured from the browser), and against the model's tokenizer read
here with `tokenizers` (the reference for the token strings). A screenshot of every state is
written to the test's tmp_path.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

pytestmark = pytest.mark.slow

BGE = "BAAI/bge-m3"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# The /v1/score option that picks the ranking score (SIE's) and its values: the model's
# score_modes (this and SCORE in page/app.js change together).
SCORE_OPTION = "score_mode"
TOP_TERMS = 10  # page/app.js TOP_TERMS
TEXTS = ["Sparse retrieval weighs the terms of a document.",
         "ColBERT compares every query token with every document token.",
         "Die Katze schläft auf dem warmen Sofa."]
QUERY = "How does ColBERT match tokens?"
KEY = "page-test-key-5d1f"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


# ------------------------------------------------------------------ the routes, over HTTP

def test_tokens_route_is_the_tokenizers(bge_m3_server, bge_m3_dir: Path):
    """/v1/tokens gives the ids the model computes on and the tokenizer's strings for them,
    and decodes ids as the model's tokenizer does; bad input is a 400 naming the field."""
    ref = Tokenizer.from_file(str(bge_m3_dir / "tokenizer.json"))
    url = f"{bge_m3_server.url}/v1/tokens/{BGE}"
    ids = [35378, 8999, 6, 0, 250001]
    body = httpx.post(url, json={"items": [{"text": t} for t in TEXTS], "ids": ids}).json()
    for text, item in zip(TEXTS, body["items"]):
        enc = ref.encode(text)
        assert item["ids"] == enc.ids and item["tokens"] == enc.tokens
    assert body["ids"] == [{"id": i, "token": ref.id_to_token(i),
                            "text": ref.decode([i], skip_special_tokens=False)} for i in ids]
    # a multivector output has a row for each token but <s>: the tokens' tail
    enc = httpx.post(f"{bge_m3_server.url}/v1/encode/{BGE}", json={
        "items": [{"text": t} for t in TEXTS],
        "params": {"output_types": ["multivector"]}}).json()
    for item, tokens in zip(enc["items"], body["items"]):
        assert item["multivector"]["num_tokens"] == len(tokens["ids"]) - 1
    for bad, field in (({"ids": [5, -1]}, "ids[1]"), ({"ids": [0, 250002]}, "ids[1]"),
                       ({"ids": [1.5]}, "ids[0]"), ({"ids": "7"}, "ids"),
                       ({"items": [{"text": 3}]}, "items[0].text"), ({"other": 1}, "body.other"),
                       ({"options": {"is_query": "yes"}}, "options.is_query")):
        r = httpx.post(url, json=bad)
        assert r.status_code == 400 and field in r.json()["detail"]["message"], (bad, r.text)
    assert httpx.post(f"{bge_m3_server.url}/v1/tokens/no/such", json={"ids": [1]}
                      ).json()["detail"]["code"] == "MODEL_NOT_FOUND"


@pytest.fixture(scope="module")
def keyed_server(start_module_server, bge_m3_dir: Path):
    return start_module_server(["--model", f"{BGE}={bge_m3_dir}", "--default-model", BGE,
                         "--api-key", KEY])


def test_page_files_are_open_and_the_rest_needs_the_key(keyed_server):
    """The page's files load without a key (they hold nothing secret), from this origin only
    (CSP); /status and /v1/tokens need the key like every other route."""
    url = keyed_server.url
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"),
                       ("icon.svg", "image/svg+xml")):
        r = httpx.get(f"{url}/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert f"/ui/{name}" in page.text
    missing = httpx.get(f"{url}/ui/index.htm")
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "NOT_FOUND"
    key = {"authorization": f"Bearer {KEY}"}
    for method, path, body in (("GET", "/status", None), ("GET", "/v1/models", None),
                               ("POST", f"/v1/tokens/{BGE}", {"ids": [6]})):
        assert httpx.request(method, url + path, json=body).status_code == 401, path
        assert httpx.request(method, url + path, json=body, headers=key).status_code == 200
    errors = httpx.get(f"{url}/status", headers=key).json()["errors"]
    unauthorized = next(e for e in errors if e["code"] == "UNAUTHORIZED")
    assert unauthorized["count"] >= 3 and unauthorized["message"] == "missing or invalid API key"


def test_status_counts_what_the_engine_did(bge_m3_server):
    """/status: placement, and per model the engine's own totals; error responses by code."""
    url = bge_m3_server.url
    before = httpx.get(f"{url}/status").json()
    enc = httpx.post(f"{url}/v1/encode/{MINILM}", json={"items": [{"text": t} for t in TEXTS]})
    refused = httpx.post(f"{url}/v1/encode/{MINILM}", json={"items": []})
    after = httpx.get(f"{url}/status").json()
    assert (after["device"], after["dtype"]) == ("cpu", "float32")  # conftest's flags
    b, a = before["models"][MINILM], after["models"][MINILM]
    assert a["state"] == "loaded" and a["memory_bytes"] > 0 and a["queued_tokens"] == 0
    assert a["items"] - b["items"] == len(TEXTS)
    assert a["tokens"] - b["tokens"] == sum(i["token_count"] for i in enc.json()["items"])
    assert a["requests"] - b["requests"] == 2
    error = next(e for e in after["errors"] if e["code"] == "INVALID_INPUT")
    assert error["message"] == refused.json()["detail"]["message"]
    assert (error["status"], error["route"], error["model"]) == (400, "encode", MINILM)
    was = next((e["count"] for e in before["errors"] if e["code"] == "INVALID_INPUT"), 0)
    assert error["count"] == was + 1


# ------------------------------------------------------------------ in the browser

@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}); scripts/setup-apt.sh "
                    "installs it (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright (the test extra) is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Tab:
    """A page in its own browser context, recording console errors, requests that leave the
    server's origin, and the server's answers to the page's POSTs."""

    def __init__(self, browser, base: str, viewport: dict) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.base = base
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.responses: list = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request",
                     lambda r: r.url.startswith(base + "/") or self.foreign.append(r.url))
        self.page.on("response", lambda r: r.request.method == "POST" and self.responses.append(r))
        self.page.goto(base + "/")

    def posted(self, path: str) -> list[tuple[dict, dict]]:
        """(request body, response body) of the page's POSTs to `path`, in order."""
        return [(r.request.post_data_json, r.json()) for r in self.responses
                if r.url == self.base + path]

    def shot(self, folder: Path, name: str) -> None:
        self.page.screenshot(path=str(folder / f"{name}.png"), full_page=True)

    def run(self, model: str, texts: list[str], query: str) -> None:
        """Fill the playground and press Encode with the keyboard; wait for the results."""
        p = self.page
        p.select_option("#model", model)
        p.fill("#texts", "\n".join(texts))
        p.fill("#query", query)
        self.responses.clear()
        p.focus("#query")
        for _ in range(8):  # Tab through the output checkboxes to the button
            if p.evaluate("document.activeElement.id") == "run":
                break
            p.keyboard.press("Tab")
        assert p.evaluate("document.activeElement.id") == "run"
        p.keyboard.press("Enter")
        p.wait_for_selector("#run:not([disabled])")
        p.wait_for_selector("#dense-result:not([hidden])")
        p.wait_for_selector("#score-result:not([hidden])")

    def close(self) -> None:
        self.context.close()


def cosines(vectors: list[list[float]]) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def heatmap(page, selector: str) -> np.ndarray:
    cells = page.eval_on_selector_all(f"{selector} rect.cell", """cells => cells.map(c =>
        [Number(c.dataset.row), Number(c.dataset.col), Number(c.dataset.value)])""")
    rows, cols = max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1
    out = np.full((rows, cols), np.nan)
    for r, c, v in cells:
        out[r, c] = v
    assert len(cells) == rows * cols
    return out


def top_terms(sparse: dict) -> list[tuple[int, float]]:
    """The heaviest TOP_TERMS (id, weight), heaviest first, ties by id (as the page)."""
    terms = sorted(zip(sparse["indices"], sparse["values"]), key=lambda t: (-t[1], t[0]))
    return terms[:TOP_TERMS]


def check_page_fits(page) -> None:
    """No horizontal scrolling of the page itself (wide tables scroll in their own box)."""
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_page_in_a_browser(browser, bge_m3_server, bge_m3_dir: Path, tmp_path: Path):
    """Status and playground on BGE-M3 and MiniLM at desktop and phone widths: models listed,
    heatmap = /v1/encode's cosines, sparse terms = the server's top weights decoded by the
    tokenizer, MaxSim alignment = the dot products of the multivector rows, ranks = /v1/score
    for every score mode, counters and errors refreshed; no console errors, no request
    leaving the server."""
    url = bge_m3_server.url
    listed = httpx.get(f"{url}/v1/models").json()["models"]
    ref = Tokenizer.from_file(str(bge_m3_dir / "tokenizer.json"))
    tab = Tab(browser, url, DESKTOP)
    page = tab.page
    try:
        page.wait_for_selector(f'#models-body tr[data-model="{BGE}"]')
        shown = page.eval_on_selector_all("#models-body tr, #catalog-body tr",
                                          "rows => rows.map(r => r.dataset.model)")
        assert sorted(shown) == sorted(m["name"] for m in listed)
        facts = page.inner_text("#server-facts")
        assert "cpu" in facts and "float32" in facts  # /status: conftest's --device, --dtype
        tab.shot(tmp_path, "desktop-status")

        tab.run(BGE, TEXTS, QUERY)
        # the texts' encode is answered before the query's is sent
        (sent, encoded), (_, query_encoded) = tab.posted(f"/v1/encode/{BGE}")
        assert [i["text"] for i in sent["items"]] == TEXTS
        assert sent["params"]["output_types"] == ["dense", "sparse", "multivector"]
        # dense: the heatmap's cells are the cosines of the vectors the server sent
        dense = cosines([i["dense"]["values"] for i in encoded["items"]])
        np.testing.assert_allclose(heatmap(page, "#dense-heatmap"), dense, rtol=0, atol=1e-12)
        # sparse: the server's heaviest ids, as the model's tokenizer decodes them
        for i, item in enumerate(encoded["items"]):
            terms = page.eval_on_selector_all(
                f'#sparse-terms article[data-item="{i}"] li', """lis => lis.map(li =>
                [Number(li.dataset.id), Number(li.dataset.weight),
                 li.querySelector('.term').textContent])""")
            top = top_terms(item["sparse"])
            assert terms and [t[0] for t in terms] == [t for t, _ in top]
            assert [t[1] for t in terms] == [w for _, w in top]
            assert [t[2] for t in terms] == [ref.decode([t]).strip() or ref.id_to_token(t)
                                             for t, _ in top]
        # multivector: query tokens x text tokens, dot products, MaxSim = /v1/score's
        q_rows = np.asarray(query_encoded["items"][0]["multivector"]["values"])
        d_rows = np.asarray(encoded["items"][0]["multivector"]["values"])
        np.testing.assert_allclose(heatmap(page, "#alignment"), q_rows @ d_rows.T, atol=1e-12)
        labels = page.eval_on_selector_all("#alignment text.row-label",
                                           "t => t.map(x => x.textContent)")
        assert labels == ref.encode(QUERY).tokens[1:]
        maxsim = float(page.get_attribute("#alignment .maxsim", "data-maxsim"))
        assert math.isclose(maxsim, (q_rows @ d_rows.T).max(axis=1).mean(), abs_tol=1e-12)
        # ranks of every score mode, as /v1/score gives them
        modes = next(m for m in listed if m["name"] == BGE)["score_modes"]
        scored = {body["options"][SCORE_OPTION]: answer  # answered in any order
                  for body, answer in tab.posted(f"/v1/score/{BGE}")}
        assert sorted(scored) == sorted(modes)
        assert page.eval_on_selector_all("#scores th[scope=col]", "t => t.map(x => x.textContent)"
                                         ) == ["Text", *modes]
        for mode, answer in scored.items():
            cells = page.eval_on_selector_all(f'#scores td[data-mode="{mode}"]', """tds =>
                tds.map(td => [td.dataset.item, Number(td.dataset.rank), Number(td.dataset.score)])""")
            assert sorted(cells, key=lambda c: c[1]) == [
                [s["item_id"], s["rank"], s["score"]] for s in answer["scores"]]
        served = {s["item_id"]: s["components"]["colbert"] for s in scored["colbert"]["scores"]}
        assert math.isclose(maxsim, served["0"], abs_tol=1e-5)  # server float32, page float64
        # the terms' words came from the server (the page asked /v1/tokens for those ids)
        shown_ids = page.eval_on_selector_all("#sparse-terms li",
                                              "l => l.map(x => Number(x.dataset.id))")
        [asked] = [body for body, _ in tab.posted(f"/v1/tokens/{BGE}") if body.get("ids")]
        assert sorted(asked["ids"]) == sorted(set(shown_ids))
        tab.shot(tmp_path, "desktop-bge-m3")

        # status refreshes from the engine's counters; errors appear by code as worded
        refused = httpx.post(f"{url}/v1/score/{BGE}", json={"query": {"text": "q"}, "items": [
            {"text": "x"}], "options": {SCORE_OPTION: "nonsense"}})
        items = httpx.get(f"{url}/status").json()["models"][BGE]["items"]
        page.wait_for_function("""([name, items]) => {
            const cell = document.querySelector(`#models-body tr[data-model="${name}"] td[data-key=items]`);
            return cell && cell.textContent === String(items); }""", arg=[BGE, items], timeout=15000)
        message = refused.json()["detail"]["message"]
        page.wait_for_selector('#errors tr[data-code="INVALID_INPUT"]', timeout=15000)
        page.wait_for_function("""m => document.querySelector('#errors tr[data-code="INVALID_INPUT"] .message')
            .textContent === m""", arg=message, timeout=15000)

        # MiniLM: dense only (its other outputs cannot be chosen), no scores
        page.select_option("#model", MINILM)
        choices = page.eval_on_selector_all("#outputs input", "b => b.map(x => [x.value, x.disabled])")
        assert choices == [["dense", False], ["sparse", True], ["multivector", True]]
        tab.run(MINILM, TEXTS[:2] + ["A third, unrelated sentence about trains."], QUERY)
        [(_, mini)] = tab.posted(f"/v1/encode/{MINILM}")
        mini_cosines = cosines([i["dense"]["values"] for i in mini["items"]])
        np.testing.assert_allclose(heatmap(page, "#dense-heatmap"), mini_cosines, atol=1e-12)
        assert page.is_hidden("#sparse-result") and page.is_hidden("#multivector-result")
        assert "does not score" in page.inner_text("#scores")
        check_page_fits(page)
        tab.shot(tmp_path, "desktop-minilm")
        assert tab.errors == [] and tab.foreign == []
    finally:
        tab.close()

    phone = Tab(browser, url, PHONE)
    try:
        phone.page.wait_for_selector(f'#models-body tr[data-model="{BGE}"]')
        check_page_fits(phone.page)
        phone.shot(tmp_path, "phone-status")
        phone.run(BGE, TEXTS, QUERY)
        phone.page.wait_for_selector("#multivector-result:not([hidden])")
        check_page_fits(phone.page)
        phone.shot(tmp_path, "phone-bge-m3")
        assert phone.errors == [] and phone.foreign == []
    finally:
        phone.close()


def test_page_with_api_keys(browser, keyed_server, tmp_path: Path):
    """With keys on, the page shows nothing that needs one until it has one: refused without
    a key and with a wrong one (the server's own words), served with the right one, which it
    sends only as a bearer token and keeps in the tab."""
    server = keyed_server
    tab = Tab(browser, server.url, DESKTOP)
    page = tab.page
    sent_keys: list[str | None] = []
    page.on("request", lambda r: sent_keys.append(r.headers.get("authorization")))
    try:
        page.wait_for_selector("#key-section:not([hidden])")
        assert page.is_hidden("#status") and page.is_hidden("#playground")
        assert "UNAUTHORIZED" in page.inner_text("#error")
        assert "missing or invalid API key" in page.inner_text("#error")
        assert BGE not in page.content()
        assert "version" in page.inner_text("#version")  # /health is open
        tab.shot(tmp_path, "keys-refused")

        page.fill("#key-input", "not-the-key")
        page.press("#key-input", "Enter")
        page.wait_for_function(
            "() => document.querySelector('#key-reason').textContent.includes('refused')")
        assert page.is_hidden("#status") and BGE not in page.content()
        tab.shot(tmp_path, "keys-wrong")

        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector(f'#models-body tr[data-model="{BGE}"]')
        assert page.is_hidden("#key-section") and page.is_hidden("#error")
        tab.run(BGE, TEXTS, QUERY)
        [(_, encoded), _] = tab.posted(f"/v1/encode/{BGE}")
        dense = cosines([i["dense"]["values"] for i in encoded["items"]])
        np.testing.assert_allclose(heatmap(page, "#dense-heatmap"), dense, atol=1e-12)
        tab.shot(tmp_path, "keys-served")

        assert f"Bearer {KEY}" in sent_keys and "Bearer not-the-key" in sent_keys
        assert set(sent_keys) <= {None, f"Bearer {KEY}", "Bearer not-the-key"}
        assert page.evaluate("sessionStorage.getItem('sie-api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0
        assert KEY not in page.url and KEY not in server.output()
        refused = [e for e in tab.errors if "status of 401" not in e]
        assert refused == [] and tab.foreign == []

        page.click("#forget-key")  # back to asking
        page.wait_for_selector("#key-section:not([hidden])")
        assert page.evaluate("sessionStorage.getItem('sie-api-key')") is None
    finally:
        tab.close()
