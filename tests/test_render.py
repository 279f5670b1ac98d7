"""Confined rendering of model-written SVG / Python (vzero_fast/render.py, vzero_fast/render_worker.py).

References: resvg's own output size (the worker's size resolver must agree with it before it renders);
geometry written into the SVG / the figure (a red rect or bar must come out red where it was drawn); the
failure rules of ALGORITHMS.md section 2 (Coder), each at its boundary; the test process's own VmHWM
(/proc/self/status) for "the trainer's memory does not move"; a listening socket and a file path that
confined code must not reach. Every render goes through the real sandbox (skipped where vzero_fast.sandbox
cannot run); the escape tests also run unconfined once, to show that they can fail.
"""

import io
import socket
import struct

import pytest
from PIL import Image

from vzero_fast.render import RenderPool, RenderResult, classify
from vzero_fast.render_worker import RenderError, svg_size

resvg_py = pytest.importorskip("resvg_py")

NS = 'xmlns="http://www.w3.org/2000/svg"'
BAR_PY = ("import matplotlib.pyplot as plt\n"
          "fig, ax = plt.subplots(figsize=(4, 3), dpi=100)\n"
          "ax.bar([0, 1, 2], [3, 5, 4], width=0.9, color='red')\n"
          "ax.set_ylim(0, 5)\nax.set_title('Sales')\n")
HWM_BOUND_MIB = 64  # the trainer's peak RSS may grow by this much at most over a batch of rejected renders


def _sandbox_error() -> str | None:
    try:
        from vzero_fast import sandbox

        r = sandbox.run_confined(["/bin/true"], timeout=10)
        return None if r.returncode == 0 else f"vzero-sandbox /bin/true exited {r.returncode}: {r.stderr[-200:]!r}"
    except Exception as e:  # noqa: BLE001 -- any reason the sandbox cannot run here skips the confined tests
        return f"{type(e).__name__}: {e}"


SANDBOX_ERROR = _sandbox_error()
needs_sandbox = pytest.mark.skipif(SANDBOX_ERROR is not None, reason=f"sandbox unavailable: {SANDBOX_ERROR}")


@pytest.fixture(scope="module")
def pool():
    if SANDBOX_ERROR is not None:
        pytest.skip(f"sandbox unavailable: {SANDBOX_ERROR}")
    with RenderPool(2, language="svg", timeout=30.0) as p:
        yield p


def _svg(attrs: str, body: str = "") -> str:
    return f"<svg {NS} {attrs}>{body}</svg>"


def _vm(key: str) -> int:
    """VmRSS / VmHWM of this process in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return buf.getvalue()


# -- the size resolver against resvg itself (in this process: every size here is tiny) --------------------

LENGTHS = [None, "37", "37.5", "20px", "15pt", "2pc", "9mm", "1.2cm", "0.7in", "6em", "9ex", "40%", "abc",
           " 12", "12 ", "1e1", "12.5", "+8", ".5e2"]
VIEWBOXES = [None, "0 0 90 60", "10,10 50 120", "bad"]


def test_svg_size_agrees_with_resvg():
    cases = 0
    for vb in VIEWBOXES:
        for w in LENGTHS:
            for h in LENGTHS:
                attrs = " ".join(f'{k}="{v}"' for k, v in (("width", w), ("height", h), ("viewBox", vb)) if v)
                svg = _svg(attrs)
                png = resvg_py.svg_to_bytes(svg_string=svg, dpi=96.0)
                expected = struct.unpack(">II", png[16:24])
                assert svg_size(svg) == expected, svg
                cases += 1
    assert cases == len(VIEWBOXES) * len(LENGTHS) ** 2


def test_svg_size_rules_at_their_boundaries():
    assert svg_size(_svg('width="1000" height="10"')) == (1000, 10)  # aspect exactly 100: allowed
    assert svg_size(_svg('width="16384" height="200"')) == (16384, 200)
    assert svg_size('<?xml version="1.0"?>\n<!-- a chart -->\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
                    '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n' + _svg('width="7" height="9"')) == (7, 9)
    for attrs, reason in [('width="1010" height="10"', "aspect"), ('width="10" height="1010"', "aspect"),
                          ('width="16385" height="200"', "too-large"), ('width="100000" height="100000"', "too-large"),
                          ('width="1e300" height="1e300"', "too-large"), ('width="&#49;00000" height="9000"', "too-large"),
                          ('width="0" height="10"', "zero-side"), ('width="-3" height="10"', "zero-side"),
                          ('viewBox="0 0 0 10"', "zero-side"), ('width="5" height="5" viewBox="0 0 -5 5"', "zero-side"),
                          ('width="0%" height="10"', "zero-side")]:
        with pytest.raises(RenderError) as e:
            svg_size(_svg(attrs))
        assert e.value.reason == reason, attrs


# -- the parent's re-check of what a child sends back ---------------------------------------------------

def test_classify_rechecks_the_png():
    good = _png(30, 20)
    r = classify(0, good, b"", None, 0.1)
    assert (r.ok, r.width, r.height, r.error, r.png) == (True, 30, 20, "", good)
    assert classify(0, b"", b"", None, 0.1).error == "empty-png"
    assert classify(0, b"GIF89a" + bytes(40), b"", None, 0.1).error == "empty-png"
    huge = bytearray(good)  # a header that lies about the size: the rules apply to what the header says
    huge[16:20] = struct.pack(">I", 20000)
    assert classify(0, bytes(huge), b"", None, 0.1).error == "too-large"
    corrupt = bytearray(good)  # a 30 x 20 header, a damaged IDAT: PIL's verify refuses it
    at = corrupt.index(b"IDAT") + 6
    corrupt[at] ^= 0xFF
    assert classify(0, bytes(corrupt), b"", None, 0.1).error.startswith("renderer: invalid PNG")
    assert classify(0, good[:40], b"", None, 0.1).error.startswith("renderer: invalid PNG")
    buf = io.BytesIO()  # the largest canvas the rules allow passes (PIL's decompression-bomb guard would refuse it)
    Image.new("1", (16384, 16384)).save(buf, format="PNG")
    r = classify(0, buf.getvalue(), b"", None, 0.1)
    assert r.ok and (r.width, r.height) == (16384, 16384)


def test_classify_maps_child_outcomes():
    assert classify(124, b"", b"", None, 1.0).error == "timeout"
    assert classify(137, b"", b"limit: memory\n", "memory", 1.0).error == "memory"
    assert classify(137, b"", b"", "timeout", 1.0).error == "timeout"
    assert classify(137, b"", b"", "cpu", 1.0).error == "timeout"
    assert classify(137, b"", b"", "output", 1.0).error == "output-limit"
    assert classify(137, b"", b"", "processes", 1.0).error == "limit: processes"
    assert classify(134, b"", b"memory allocation of 40000000000 bytes failed\n", None, 1.0).error == "memory"
    assert classify(17, b"", b"renderer: bad path\n", None, 1.0).error == "renderer: bad path"
    assert classify(14, b"", b"aspect\n", None, 1.0).error == "aspect"
    assert classify(-11, b"", b"", None, 1.0).error == "crashed: signal 11"
    assert classify(139, b"", b"", None, 1.0).error == "crashed: signal 11"
    r = classify(3, b"\x89PNG", b"Traceback ...\nImportError: no resvg\n", None, 1.0)
    assert not r.ok and r.png is None and r.error.startswith("renderer: exit 3: ImportError")


def test_confined_pool_without_a_sandbox_refuses_to_start(tmp_path, monkeypatch):
    from vzero_fast.sandbox import SandboxUnavailable

    monkeypatch.setenv("VZERO_SANDBOX", str(tmp_path / "no-such-binary"))
    with pytest.raises(SandboxUnavailable):
        RenderPool(1)


def test_pool_validates_its_config():
    for kwargs in ({"workers": 0}, {"language": "js"}, {"timeout": 0}, {"memory_mib": 10}):
        with pytest.raises(ValueError):
            RenderPool(**{"confined": False, **kwargs})


# -- SVG through the sandbox ----------------------------------------------------------------------------

def test_valid_svg_renders_at_its_declared_size(pool):
    body = '<rect width="300" height="200" fill="white"/><rect x="20" y="30" width="100" height="50" fill="#ff0000"/>'
    r = pool.submit(_svg('width="300" height="200"', body)).result()
    assert r.ok and r.error == "" and (r.width, r.height) == (300, 200) and r.seconds > 0
    with Image.open(io.BytesIO(r.png)) as im:
        assert im.size == (300, 200)
        rgb = im.convert("RGB")
        assert rgb.getpixel((70, 55)) == (255, 0, 0)  # inside the red rect
        assert rgb.getpixel((200, 150)) == (255, 255, 255)
    r = pool.submit(_svg('width="2in" height="1in" viewBox="0 0 20 10"', body)).result()
    assert r.ok and (r.width, r.height) == (192, 96)  # 96 px per inch


def test_each_failure_rule_through_the_pool(pool):
    before = pool.stats()
    cases = {"": "blank", "  \n\t": "blank", "Here is the chart: " + _svg('width="9" height="9"'): "not-svg",
             _svg('width="0" height="100"'): "zero-side", _svg('width="1010" height="10"'): "aspect",
             _svg('width="16385" height="200"'): "too-large", f"<svg {NS} width='10' height='10'><rect></sv>":
             "renderer", "<html><body/></html>": "renderer"}
    results = pool.map(list(cases))
    for (code, reason), r in zip(cases.items(), results):
        assert isinstance(r, RenderResult) and not r.ok and r.png is None, code
        assert r.error.split(":", 1)[0] == reason, (code, r.error)
    assert results[0].seconds == 0 and results[2].seconds == 0  # decided in the parent, no child
    after = pool.stats()
    assert after["renders"] - before["renders"] == len(cases)
    grew = {k: v - before["failures"].get(k, 0) for k, v in after["failures"].items()}
    assert {k: v for k, v in grew.items() if v} == {"blank": 2, "not-svg": 1, "zero-side": 1, "aspect": 1,
                                                   "too-large": 1, "renderer": 2}
    ok = pool.map([_svg('width="1000" height="10"'), _svg('width="16384" height="200"')])  # the boundaries pass
    assert [(r.ok, r.width, r.height) for r in ok] == [(True, 1000, 10), (True, 16384, 200)]


def test_hostile_svgs_fail_without_moving_the_trainers_memory(pool):
    laughs = '<?xml version="1.0"?>\n<!DOCTYPE svg [\n<!ENTITY lol "lol">\n'
    for i in range(1, 10):
        laughs += f'<!ENTITY lol{i} "' + f"&lol{i - 1 if i > 1 else ''};" * 10 + '">\n'
    laughs += f"]>\n<svg {NS} width=\"100\" height=\"100\"><text y=\"20\">&lol9;</text></svg>"
    hostile = [_svg('width="100000" height="100000"'), laughs,
               _svg('width="&#49;00000" height="&#49;00000"'),  # a character reference hides nothing
               f"<svg {NS} viewBox='0 0 100000 100000'/>"]
    hwm, before = _vm("VmHWM"), pool.stats()
    results = pool.map(hostile * 2)
    assert [r.error for r in results] == ["too-large", "doctype", "too-large", "too-large"] * 2
    assert (_vm("VmHWM") - hwm) / 1024 < HWM_BOUND_MIB
    assert pool.stats()["renders"] - before["renders"] == 8
    after = pool.submit(_svg('width="64" height="48"', '<circle cx="32" cy="24" r="10"/>')).result()
    assert after.ok and (after.width, after.height) == (64, 48)  # and the pool keeps rendering


def test_a_size_the_root_tag_hides_is_capped_at_the_checked_size(pool):
    # A style sheet sets the root's font-size to 20 px: resvg alone would make 200 x 100. The root tag
    # reads 10em x 5em = 160 x 80 at the default 16 px, and the render is held to that checked box.
    svg = f"<svg {NS} width='10em' height='5em'><style>svg{{font-size:20px}}</style><rect width='5' height='5'/></svg>"
    assert struct.unpack(">II", resvg_py.svg_to_bytes(svg_string=svg, dpi=96.0)[16:24]) == (200, 100)
    r = pool.submit(svg).result()
    assert r.ok and (r.width, r.height) == (160, 80)


@needs_sandbox
def test_a_broken_sandbox_raises_instead_of_failing_renders(tmp_path, monkeypatch):
    fake = tmp_path / "fake-sandbox"
    fake.write_text("#!/bin/sh\necho 'vzero-sandbox: cannot create a mount namespace' >&2\nexit 125\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VZERO_SANDBOX", str(fake))
    with RenderPool(1) as p:
        with pytest.raises(RuntimeError, match="exit 125.*mount namespace"):
            p.submit(_svg('width="9" height="9"')).result()
        assert p.stats()["renders"] == 0


@needs_sandbox
def test_memory_limit_turns_a_renderer_abort_into_one_failed_render():
    # 12000 x 12000 is within the size rules, but its 549 MiB canvas is over a 256 MiB limit: resvg's
    # allocation fails (a Rust abort in the child), and the pool goes on.
    with RenderPool(1, memory_mib=256, timeout=60.0) as p:
        big, small = p.map([_svg('width="12000" height="12000"', '<rect width="9" height="9"/>'),
                            _svg('width="20" height="10"')])
    assert not big.ok and big.error == "memory", big.error
    assert small.ok and (small.width, small.height) == (20, 10)


# -- Python (matplotlib) mode ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def py_pool():
    if SANDBOX_ERROR is not None:
        pytest.skip(f"sandbox unavailable: {SANDBOX_ERROR}")
    with RenderPool(2, language="python", timeout=30.0) as p:
        yield p


def test_python_bar_chart_renders(py_pool):
    saved = "import matplotlib.pyplot as plt\nplt.figure(figsize=(2, 1), dpi=50)\nplt.plot([1, 2])\n" \
            "plt.savefig('chart.png')\nplt.close('all')\n"
    bar, file = py_pool.map([BAR_PY + "print('noise on stdout')\n", saved])
    assert bar.ok and (bar.width, bar.height) == (400, 300), bar.error
    with Image.open(io.BytesIO(bar.png)) as im:
        rgb = im.convert("RGB")
    # the middle bar (x = 1, height 5 = the y limit) fills the axes' middle column from bottom to top
    assert rgb.getpixel((200, 150)) == (255, 0, 0)
    assert file.ok and (file.width, file.height) == (100, 50)  # the PNG the code saved, not a new figure


def test_python_failure_rules(py_pool):
    codes = {"": "blank", "x = 1\n": "empty-png", "open('out.png', 'wb').close()\n": "empty-png",
             "1 / 0\n": "renderer", "import matplotlib.pyplot as plt\nplt.figure(figsize=(101, 1), dpi=100)\n":
             "aspect", "import matplotlib.pyplot as plt\nplt.figure(figsize=(170, 10), dpi=100)\n": "too-large",
             "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n": "crashed"}
    results = py_pool.map(list(codes))
    for (code, reason), r in zip(codes.items(), results):
        assert not r.ok and r.error.split(":", 1)[0] == reason, (code, r.error)
    assert results[3].error == "renderer: ZeroDivisionError: division by zero"
    assert results[6].error == "crashed: signal 15"
    assert py_pool.submit(BAR_PY).result().ok  # a crashed child cost one render, not the pool


@needs_sandbox
def test_python_timeout():
    with RenderPool(1, language="python", timeout=2.0) as p:
        r = p.submit("while True:\n    pass\n").result()
    assert not r.ok and r.error == "timeout" and 2.0 <= r.seconds < 20


def _escapes(tmp_path, confined: bool):
    target = tmp_path / "escaped.txt"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        write = f"open({str(target)!r}, 'w').write('out')\n" + BAR_PY
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).sendall(b'x')\n" + BAR_PY
        with RenderPool(2, language="python", confined=confined) as p:
            results = p.map([write, connect])
        try:
            server.accept()[0].close()
            connected = True
        except TimeoutError:
            connected = False
    return results, target.exists(), connected


@needs_sandbox
def test_python_code_cannot_write_outside_its_dir_or_open_a_socket(tmp_path):
    (write, connect), wrote, connected = _escapes(tmp_path, confined=True)
    assert not wrote and not connected
    assert not write.ok and write.error.startswith("renderer: "), write.error
    assert not connect.ok and connect.error.startswith("renderer: "), connect.error


def test_unconfined_python_does_escape(tmp_path):
    """The control for the test above: the same code, unconfined, writes and connects (so that test can fail)."""
    (write, connect), wrote, connected = _escapes(tmp_path, confined=False)
    assert wrote and connected and write.ok and connect.ok


@needs_sandbox
def test_pool_runs_children_concurrently():
    sleepy = "import time\ntime.sleep(1.0)\n" + BAR_PY
    with RenderPool(2, language="python") as p:
        results = p.map([sleepy] * 4)
        stats = p.stats()
    assert all(r.ok for r in results)
    assert stats["max_concurrent"] == 2 and stats["renders"] == 4 and stats["ok"] == 4
    assert stats["seconds"] == pytest.approx(sum(r.seconds for r in results))


def test_benchmark_smoke(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_render.py"
    spec = importlib.util.spec_from_file_location("bench_render", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.charts(3) == bench.charts(3) and len(set(bench.charts(50))) == 50
    bench.main(["--smoke", "--workers", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    modes = {r["mode"] for r in last["rows"]}
    assert {"unconfined", "in-process"} <= modes and ("sandbox" in modes) == (SANDBOX_ERROR is None)
    assert all(r["ok"] == r["renders"] == 6 for r in last["rows"])
