"""The web page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`)
driven by selenium against a local cluster (dealer, two replicas, the page's own origin).

The page draws or takes an image, preprocesses it, encodes it in fixed point and splits it into
two shares in the browser; these tests require its labels, its 28x28 inputs (within one grey
level) and its wire encoding (byte for byte) to equal the Python client's, a human error when
a replica is down, and a page that loads nothing from elsewhere under a strict CSP.

Without a browser the tests skip locally and fail in CI (`CI=true`): `make setup` installs it.
Screenshots go to each test's tmp_path. `PRIVDIGIT_DOCS_SCREENSHOT=docs/web-page.png` makes the
drawing test also save the page there: `make screenshot` makes docs/web-page.png that way.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from clients import privdigit
from service.cluster import Cluster, free_ports

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
CHROMIUM = Path(os.environ.get("PRIVDIGIT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("PRIVDIGIT_CHROMEDRIVER", "/usr/bin/chromedriver"))
WAIT = 30.0  # seconds: generous, the machine is shared
POLL = 0.05  # seconds between looks at the page while waiting
UPLOADS = 24  # real MNIST test images uploaded through the file input
GREY_LEVEL = 1.0 / 255.0

RESULT = """
const r = document.querySelector('[data-testid=result]');
const err = document.querySelector('[data-testid=error]');
return {
  state: r.dataset.state,
  seq: Number(r.dataset.seq),
  label: document.querySelector('[data-testid=label]').textContent,
  error: err.hidden ? '' : err.textContent,
  latency: document.querySelector('[data-testid=latency]').textContent,
};
"""

# Lit pixels of a canvas, and the distinct grey levels it holds.
CANVAS_STATS = """
const c = document.querySelector(arguments[0]);
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let lit = 0; const levels = new Set();
for (let i = 0; i < d.length; i += 4) { if (d[i] > 0) lit++; levels.add(d[i]); }
return {lit: lit, levels: levels.size, pixels: d.length / 4};
"""


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return (
            f"{' and '.join(missing)} not found; install Debian's chromium and chromium-driver "
            "(`make setup` does, or apt-get install chromium chromium-driver)"
        )
    return None


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ports = free_ports(4)
    c = Cluster(
        ports=ports[:3],
        web_port=ports[3],
        log_dir=tmp_path_factory.mktemp("web-logs"),
        replica_args=("--peer-timeout", "5"),
    )
    with c:
        yield c


@pytest.fixture(scope="module")
def driver():
    missing = _browser_missing()
    if missing:
        if _in_ci():
            pytest.fail(f"the browser test cannot run in CI: {missing}", pytrace=False)
        pytest.skip(f"no headless browser: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    d.set_script_timeout(WAIT * 2)
    d.set_page_load_timeout(WAIT * 2)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture
def page(driver, cluster):
    """The page freshly loaded, its configuration read and the replicas' model known."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{cluster.web_url}/")
    WebDriverWait(driver, WAIT, POLL).until(
        lambda d: d.execute_script("return !!window.__privdigit")
    )
    ready = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.__privdigit.ready.then(() => done('ok'), (e) => done(String(e)));"
    )
    assert ready == "ok", ready
    driver.get_log("browser")  # start each test with an empty console log
    return driver


@pytest.fixture(scope="module")
def mnist_pngs(tmp_path_factory) -> list[Path]:
    """Real MNIST test images as PNG files: enlarged 4x, half of them dark ink on light paper,
    some RGB, some off-centre on a larger non-square sheet."""
    data = np.load(FIXTURES / "mnist_test_1000.npz")
    images, labels = data["images"], data["labels"]
    picks = [int(np.flatnonzero(labels == d)[k]) for k in range(3) for d in range(10)][:UPLOADS]
    out = tmp_path_factory.mktemp("mnist-png")
    filters = [Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC]
    paths = []
    for n, i in enumerate(picks):
        img = Image.fromarray(images[i]).resize((112, 112), filters[n % 3])
        if n % 2:
            img = Image.fromarray(255 - np.asarray(img))  # dark on light
        if n % 4 == 2:
            img = img.convert("RGB")
        if n % 4 == 3:
            sheet = Image.new("L", (170, 136), 255 if n % 2 else 0)
            sheet.paste(img, (40, 9))
            img = sheet
        path = out / f"mnist-{i:03d}-label{int(labels[i])}.png"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def python_labels(cluster, mnist_pngs) -> dict[Path, int]:
    with privdigit.PrivDigitClient(cluster.replica_urls) as client:
        return {p: client.predict(p).label for p in mnist_pngs}


# -- helpers ----------------------------------------------------------------------------------


def _state(driver) -> dict:
    return driver.execute_script(RESULT)


def _wait_result(driver, before: int) -> dict:
    """The result once a classification newer than `before` finished (label or error)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT, POLL).until(lambda d: _state(d)["seq"] > before)
    return _state(driver)


def _upload(driver, path: Path) -> dict:
    from selenium.webdriver.common.by import By

    before = _state(driver)["seq"]
    driver.find_element(By.CSS_SELECTOR, "[data-testid=file-input]").send_keys(str(path))
    return _wait_result(driver, before)


def _el(driver, testid: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"[data-testid={testid}]")


def _stroke(driver, canvas, points, kind: str = "mouse") -> None:
    """One stroke through `points` (fractions of the canvas) with a mouse, pen or finger."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    w, h = canvas.size["width"], canvas.size["height"]
    dense = []  # ~12 moves per segment, so the page sees a smooth stroke
    for (u0, v0), (u1, v1) in itertools.pairwise(points):
        dense += [(u0 + (u1 - u0) * t / 12, v0 + (v1 - v0) * t / 12) for t in range(12)]
    dense.append(points[-1])
    pointer = {
        "mouse": interaction.POINTER_MOUSE,
        "pen": interaction.POINTER_PEN,
        "touch": interaction.POINTER_TOUCH,
    }[kind]
    builder = ActionBuilder(driver, mouse=PointerInput(pointer, kind), duration=5)
    action = builder.pointer_action

    def at(u: float, v: float) -> tuple[int, int]:  # offsets from the element's centre
        return round((u - 0.5) * w), round((v - 0.5) * h)

    action.move_to(canvas, *at(*dense[0])).pointer_down()
    for u, v in dense[1:]:
        action.move_to(canvas, *at(u, v))
    action.pointer_up()
    builder.perform()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _page_preprocess(driver, path: Path) -> np.ndarray:
    kind = "image/jpeg" if path.suffix == ".jpg" else "image/png"
    out = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.__privdigit.preprocessBase64(arguments[0], arguments[1])"
        ".then(done, (e) => done({error: String(e)}));",
        _b64(path),
        kind,
    )
    assert isinstance(out, list), out
    return np.asarray(out, dtype=np.float64).reshape(28, 28)


def _assert_same_input(page_x: np.ndarray, path: Path) -> None:
    ref = privdigit.preprocess(path).astype(np.float64)
    diff = float(np.abs(page_x - ref).max())
    assert diff <= GREY_LEVEL, f"{path.name}: the page's 28x28 differs by {diff * 255:.2f} levels"


# -- tests ------------------------------------------------------------------------------------


def test_page_has_its_own_origin_csp_and_replicas_allow_only_it(cluster):
    r0, r1 = cluster.replica_urls
    page = httpx.get(f"{cluster.web_url}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'"):
        assert directive in csp
    assert f"connect-src 'self' {r0} {r1}" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline
    assert httpx.get(f"{cluster.web_url}/config.json").json() == {"replicas": [r0, r1]}
    for url in (r0, r1):
        allowed = httpx.options(
            f"{url}/v1/predict",
            headers={
                "Origin": cluster.web_url,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert allowed.headers.get("access-control-allow-origin") == cluster.web_url
        stranger = httpx.options(
            f"{url}/v1/predict",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in stranger.headers


def test_draw_a_digit_with_mouse_pen_and_finger_then_classify(page, cluster, tmp_path):
    canvas = _el(page, "canvas")
    _el(page, "auto").click()  # classify only on the button in this test
    lit = []
    _stroke(page, canvas, [(0.28, 0.2), (0.72, 0.2)], "mouse")  # a 7: the bar ...
    lit.append(page.execute_script(CANVAS_STATS, "[data-testid=canvas]")["lit"])
    _stroke(page, canvas, [(0.72, 0.2), (0.6, 0.45), (0.45, 0.82)], "pen")  # ... the stem
    lit.append(page.execute_script(CANVAS_STATS, "[data-testid=canvas]")["lit"])
    _stroke(page, canvas, [(0.1, 0.9), (0.2, 0.95)], "touch")  # a slip of the finger ...
    lit.append(page.execute_script(CANVAS_STATS, "[data-testid=canvas]")["lit"])
    assert 0 < lit[0] < lit[1] < lit[2], lit
    _el(page, "undo").click()  # ... undone
    assert page.execute_script(CANVAS_STATS, "[data-testid=canvas]")["lit"] == lit[1]
    page.save_screenshot(str(tmp_path / "drawn.png"))

    before = _state(page)["seq"]
    _el(page, "classify").click()
    result = _wait_result(page, before)
    page.save_screenshot(str(tmp_path / "classified.png"))
    if os.environ.get("PRIVDIGIT_DOCS_SCREENSHOT"):  # once more, warm, for the docs
        _el(page, "classify").click()
        _wait_result(page, result["seq"])
        size = page.get_window_size()
        height = page.execute_script(
            "return document.documentElement.scrollHeight + outerHeight - innerHeight"
        )
        page.set_window_size(size["width"], height)  # the whole page
        page.save_screenshot(os.environ["PRIVDIGIT_DOCS_SCREENSHOT"])
        page.set_window_size(size["width"], size["height"])
    assert result["state"] == "done" and result["error"] == "", result
    assert re.fullmatch(r"[0-9]", result["label"]), result
    assert re.fullmatch(r"\d+ ms", result["latency"]), result
    # what each party saw: the 28x28 input, and two shares that look like uniform noise
    assert page.execute_script(CANVAS_STATS, "[data-testid=input28]")["lit"] > 20
    for testid in ("share0", "share1"):
        stats = page.execute_script(CANVAS_STATS, f"[data-testid={testid}]")
        assert stats["pixels"] == 784 and stats["levels"] > 200, stats
    # the label is the Python client's for the very input the page made
    x = np.asarray(page.execute_script("return window.__privdigit.last.input"), np.float64)
    with privdigit.PrivDigitClient(cluster.replica_urls) as client:
        assert client.predict_encoded(x.reshape(28, 28))[0].label == int(result["label"])

    _el(page, "clear").click()
    assert page.execute_script(CANVAS_STATS, "[data-testid=canvas]")["lit"] == 0
    assert _state(page)["label"] == "" and _state(page)["state"] == "idle"


def test_uploaded_mnist_files_get_the_python_clients_labels(
    page, mnist_pngs, python_labels, tmp_path
):
    assert len(mnist_pngs) >= 20
    got = {}
    for n, path in enumerate(mnist_pngs):
        result = _upload(page, path)
        assert result["state"] == "done" and result["error"] == "", (path.name, result)
        got[path.name] = int(result["label"])
        # the input the page sent (in shares) is the one the Python client makes
        x = np.asarray(page.execute_script("return window.__privdigit.last.input"), np.float64)
        _assert_same_input(x.reshape(28, 28), path)
        if n in (0, 1):
            page.save_screenshot(str(tmp_path / f"upload-{path.stem}.png"))
    want = {p.name: label for p, label in python_labels.items()}
    assert got == want


def test_drop_and_paste_an_image(page, mnist_pngs, python_labels):
    """Drag-and-drop onto the pad and Ctrl+V, as the browser delivers them (a DataTransfer)."""
    for n, event in enumerate(("drop", "paste")):
        path = mnist_pngs[2 + n]
        before = _state(page)["seq"]
        page.execute_script(
            "const [b64, name, kind] = arguments;"
            "const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));"
            "const dt = new DataTransfer();"
            "dt.items.add(new File([bytes], name, {type: 'image/png'}));"
            "const target = document.querySelector('[data-testid=canvas]');"
            "const event = kind === 'drop'"
            "  ? new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})"
            "  : new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true});"
            "target.dispatchEvent(event);",
            _b64(path),
            path.name,
            event,
        )
        result = _wait_result(page, before)
        assert result["state"] == "done", (event, result)
        assert int(result["label"]) == python_labels[path], event
        assert path.name in _el(page, "source").text


def test_preprocessing_matches_the_python_client(page, mnist_pngs, tmp_path):
    data = np.load(FIXTURES / "mnist_test_1000.npz")
    images = data["images"]
    extra = []
    big = Image.fromarray(images[100]).resize((1500, 1180), Image.Resampling.BILINEAR)
    extra.append(("large.png", big))  # over 1024 px: reduced first, like Pillow's thumbnail
    huge = Image.fromarray(255 - images[105]).resize((4300, 4120), Image.Resampling.BILINEAR)
    extra.append(("huge.png", huge))  # over 4096 px: Pillow's reduce() step first
    photo = Image.fromarray(255 - images[106]).resize((120, 120), Image.Resampling.BICUBIC)
    extra.append(("grey.jpg", photo))
    extra.append(("colour.jpg", photo.convert("RGB")))
    ink = np.asarray(Image.fromarray(images[101]).resize((90, 140)), np.float64) / 255
    paper, pen = np.array([250, 240, 200]), np.array([20, 40, 160])
    rgb = paper * (1 - ink[..., None]) + pen * ink[..., None]
    extra.append(("blue-on-cream.png", Image.fromarray(rgb.astype(np.uint8), "RGB")))
    alpha = np.asarray(Image.fromarray(images[102]).resize((84, 84)))
    rgba = np.zeros((84, 84, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 30, alpha
    extra.append(("transparent.png", Image.fromarray(rgba, "RGBA")))
    extra.append(("mnist-as-is.png", Image.fromarray(images[103])))  # already MNIST: left alone
    noisy = np.clip(
        255.0
        - np.asarray(Image.fromarray(images[104]).resize((100, 100)), np.float64)
        + np.random.default_rng(7).normal(0, 6, (100, 100)),
        0,
        255,
    )
    extra.append(("noisy-paper.png", Image.fromarray(noisy.astype(np.uint8))))
    paths = list(mnist_pngs)
    for name, img in extra:
        img.save(tmp_path / name, quality=90)
        paths.append(tmp_path / name)
    for path in paths:
        _assert_same_input(_page_preprocess(page, path), path)


def test_fixed_point_shares_and_wire_encoding_match_the_python_client(page, mnist_pngs):
    rng = np.random.default_rng(11)
    extremes = [0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62), 65536, -65536, 2**32, -(2**32)]
    values = np.concatenate(
        [np.array(extremes, np.int64), rng.integers(-(2**63), 2**63 - 1, 784, np.int64)]
    )[:784].reshape(1, 1, 28, 28)
    page_json = page.execute_script(
        "const s = window.__privdigit.sharing;"
        "return JSON.stringify(s.encodeTensor(s.int64From(arguments[0]), arguments[1]));",
        [str(v) for v in values.ravel()],
        list(values.shape),
    )
    assert page_json == json.dumps(privdigit.encode_tensor(values), separators=(",", ":"))
    decoded = page.execute_script(
        "const t = window.__privdigit.sharing.decodeTensor(arguments[0]);"
        "return {shape: t.shape, values: Array.from(t.values, String)};",
        privdigit.encode_tensor(values),
    )
    assert decoded["shape"] == [1, 1, 28, 28]
    assert [int(v) for v in decoded["values"]] == values.ravel().tolist()

    # Fixed point and sharing of a real input, in the page: s0 + s1 = fixed (mod 2^64), the
    # fixed point is round(x * 2^16) of the page's x, and s1 for a given s0 is byte for byte
    # what the Python client computes.
    s0_given = rng.integers(0, 2**64 - 1, 784, np.uint64, endpoint=True)
    out = page.execute_async_script(
        "const [b64, s0, done] = arguments; const p = window.__privdigit;"
        "p.preprocessBase64(b64).then((x) => {"
        "  const s = p.sharing; const fixed = s.encodeFixed(x, 16); const shape = [1, 1, 28, 28];"
        "  const [a, b] = s.share(fixed); const [c, d] = s.share(fixed);"
        "  const [, given1] = s.share(fixed, s0);"
        "  done({x, fixed: s.encodeTensor(fixed, shape), s0: s.encodeTensor(a, shape),"
        "        s1: s.encodeTensor(b, shape), again: s.encodeTensor(c, shape),"
        "        given1: s.encodeTensor(given1, shape),"
        "        ids: [s.newRequestId(), s.newRequestId()]});"
        "}, (e) => done({error: String(e)}));",
        _b64(mnist_pngs[0]),
        [str(v) for v in s0_given],
    )
    assert "error" not in out, out
    x = np.asarray(out["x"], np.float64).reshape(1, 1, 28, 28)
    fixed = privdigit.decode_tensor(out["fixed"])
    s0, s1 = privdigit.decode_tensor(out["s0"]), privdigit.decode_tensor(out["s1"])
    assert np.array_equal(fixed, privdigit.encode_fixed(x, 16))
    assert out["fixed"] == privdigit.encode_tensor(privdigit.encode_fixed(x, 16))
    assert np.array_equal((s0.view(np.uint64) + s1.view(np.uint64)).view(np.int64), fixed)
    assert len(np.unique(s0)) == 784 and not np.array_equal(s0, fixed)  # uniform, not x
    assert not np.array_equal(s0, privdigit.decode_tensor(out["again"]))  # fresh every time
    want1 = (fixed.ravel().view(np.uint64) - s0_given).view(np.int64).reshape(1, 1, 28, 28)
    assert out["given1"] == privdigit.encode_tensor(want1)
    for rid in out["ids"]:
        assert re.fullmatch(r"[A-Za-z0-9_-]{16,128}", rid), rid
    assert out["ids"][0] != out["ids"][1]


def test_the_page_spreads_over_pairs_and_skips_a_dead_one(page, cluster, mnist):
    """Several pairs (config.json's `pairs`): a pair that cannot be reached is skipped without
    an error; a 4xx about the input is the person's error and is not tried elsewhere; every
    predict post carries its request id in X-Request-Id too."""
    x = (mnist[0][0].astype(np.float64) / 255.0).reshape(-1).tolist()
    out = page.execute_async_script(
        "const [x, good, done] = arguments; const r = window.__privdigit.replicas;"
        "const sent = []; const fetch0 = window.fetch;"
        "window.fetch = (url, init) => {"
        "  if (init && init.body) sent.push([JSON.parse(init.body).request_id,"
        "    init.headers['x-request-id']]);"
        "  return fetch0(url, init); };"
        "(async () => {"
        "  const pc = new r.PairedClient([['http://127.0.0.1:9', 'http://127.0.0.1:10'], good]);"
        "  const labels = [];"
        "  for (let i = 0; i < 3; i++) { const res = await pc.predict(Float32Array.from(x));"
        "    labels.push([res.label, res.pair]); }"
        "  const bad = new r.PairedClient([good, good]);"
        "  let tried = 0; bad.clients[1].predict = async () => { tried++; return {}; };"
        "  bad.clients[0].predict = async () => { throw new r.ServiceProblem('service', 'no',"
        "    {party: 0, code: 'bad_tensor', status: 400}); };"
        "  let refused = null;"
        "  try { await bad.predict(Float32Array.from(x)); } catch (e) { refused = e.code; }"
        "  return {labels, sent, refused, tried};"
        "})().then(done, (e) => done(String(e)));",
        x,
        list(cluster.replica_urls),
    )
    assert isinstance(out, dict), out
    with privdigit.PrivDigitClient(cluster.replica_urls) as client:
        label = client.predict_encoded(np.asarray(x).reshape(28, 28))[0].label
    assert out["labels"] == [[label, 1]] * 3
    assert out["refused"] == "bad_tensor" and out["tried"] == 0
    assert out["sent"] and all(rid == header for rid, header in out["sent"])


def test_errors_read_as_words_a_person_understands(page, cluster, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"shopping list: milk, eggs\n")
    result = _upload(page, not_image)
    assert result["state"] == "error" and result["label"] == ""
    assert "not an image" in result["error"], result

    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 255).save(blank)
    result = _upload(page, blank)
    assert result["state"] == "error" and "No digit found" in result["error"], result

    # the replicas disagree on the model version
    message = page.execute_script(
        "const r = window.__privdigit.replicas; const urls = arguments[0];"
        "const info = (party, v) => ({party, model_version: v, serving_version: null,"
        "  fixed_point: {frac_bits: 16, ring_bits: 64}, max_batch: 8});"
        "try { r.checkModels(urls, [info(0, 'aaa'), info(1, 'bbb')]); return 'no error'; }"
        "catch (e) { return e.message; }",
        list(cluster.replica_urls),
    )
    assert "different versions of the model" in message and "aaa" in message, message

    # a replica's JSON error body, here a replayed request id, becomes a sentence
    message = page.execute_async_script(
        "const done = arguments[arguments.length - 1]; const p = window.__privdigit;"
        "const s = p.sharing; const client = p.last.client;"
        "(async () => {"
        "  const model = await client.getModel();"
        "  const [a, b] = s.share(s.encodeFixed(new Float32Array(784), model.fracBits));"
        "  const id = s.newRequestId(); const shape = [1, 1, 28, 28];"
        "  const bodies = [a, b].map((sh) => ({request_id: id, input: s.encodeTensor(sh, shape),"
        "    output: 'label', model_version: model.version}));"
        "  await client.both('/v1/predict', bodies);"
        "  try { await client.both('/v1/predict', bodies); return 'no error'; }"
        "  catch (e) { return [e.kind, e.code, p.humanMessage(e)]; }"
        "})().then(done, (e) => done(String(e)));"
    )
    assert message[:2] == ["service", "replayed_request"], message
    assert "already seen this request id" in message[2], message
    page.save_screenshot(str(tmp_path / "error.png"))


def test_nothing_loads_from_elsewhere_and_no_csp_violation(page, cluster, mnist_pngs):
    canvas = _el(page, "canvas")
    before = _state(page)["seq"]
    _stroke(page, canvas, [(0.5, 0.15), (0.5, 0.85)], "mouse")  # a 1, classified on lifting
    result = _wait_result(page, before)
    assert result["state"] == "done", result
    assert _upload(page, mnist_pngs[0])["state"] == "done"
    names = page.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    origins = {re.match(r"^https?://[^/]+", n).group(0) for n in names}
    allowed = {cluster.web_url, *cluster.replica_urls}
    assert origins <= allowed, origins - allowed
    assert set(cluster.replica_urls) <= origins  # the shares went to both replicas
    assert page.execute_script("return window.__privdigit.cspViolations") == []
    severe = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_a_replica_down_is_reported_in_words(page, cluster, mnist_pngs, tmp_path):
    """Runs last in this module: it stops replica 1 of the shared cluster."""
    cluster.stop_process("replica1")
    result = _upload(page, mnist_pngs[1])
    page.save_screenshot(str(tmp_path / "replica-down.png"))
    assert result["state"] == "error" and result["label"] == "", result
    assert "Replica 1" in result["error"] and "cannot be reached" in result["error"], result
    assert "python -m service up" in result["error"], result
