"""benchmarks/onednn_impls.py: reading the problems of a ONEDNN_VERBOSE log (calls per step,
grouped convs, bad logs refused in one line), and ``--layouts`` end to end (oneDNN's own layout
really is a blocked one: a channel count that is not a multiple of 16 is padded)."""
from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from pathlib import Path

import pytest

from damo_jax.models import onednn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "onednn_impls.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import onednn_impls  # noqa: E402

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")


def _conv(prop, desc, impl="brgconv:avx512_core", ms="1.5"):
    return (f"onednn_verbose,exec,cpu,convolution,{impl},{prop},src_f32::blocked:acdb::f0 "
            f"dst_f32::blocked:acdb::f0,,alg:convolution_direct,{desc},{ms}\n")


A = "mb8_ic88oc128_ih40oh40kh3sh1dh0ph1_iw40ow40kw3sw1dw0pw1"
B = "mb2_ic32oc24_ih16oh16kh1sh1dh0ph0_iw16ow16kw1sw1dw0pw0"
G = "g96mb8_ic96oc96_ih80oh40kh5sh2dh0ph2_iw80ow40kw5sw2dw0pw2"


def _log(tmp_path, executions=3):
    step = ([_conv("forward_training", A)] * 2 + [_conv("backward_data", A)] * 2
            + [_conv("backward_weights", A)] * 2 + [_conv("forward_training", B)]
            + [_conv("backward_weights", G, impl="jit_dw:avx512_core")]
            + ["onednn_verbose,exec,cpu,reorder,jit:uni,undef,src_f32 dst_f32,,,24x32x1x1,0.003\n"])
    p = tmp_path / "step.log"
    p.write_text("onednn_verbose,info,cpu,runtime:OpenMP\nsome other output\n" + "".join(step * executions))
    return p


def test_verbose_problems_and_calls_per_step(tmp_path):
    listed, executions = onednn_impls.problems_from_verbose(_log(tmp_path, executions=3))
    assert executions == 3
    assert dict(listed) == {
        (8, 88, 40, 40, 128, 3, 1, "fwd", 1): 2,
        (8, 88, 40, 40, 128, 3, 1, "bwd_d", 1): 2,
        (8, 88, 40, 40, 128, 3, 1, "bwd_w", 1): 2,
        (2, 32, 16, 16, 24, 1, 1, "fwd", 1): 1,
        (8, 96, 80, 80, 96, 5, 2, "bwd_w", 96): 1,
    }


@pytest.mark.parametrize("text, expected", [
    ("onednn_verbose,exec,cpu,reorder,jit:uni,undef,a,,,24x32x1x1,0.003\n", "no 'onednn_verbose,exec,cpu,convolution'"),
    (_conv("forward_training", "mb8_ic8oc8_ih8oh8kh3sh1dh0ph0_iw8ow8kw3sw1dw0pw0"), "not a square k//2-padded conv"),
    (_conv("forward_training", "garbage"), "unreadable convolution line"),
])
def test_bad_verbose_log_is_one_usage_line(tmp_path, text, expected):
    p = tmp_path / "bad.log"
    p.write_text(text)
    r = subprocess.run([sys.executable, str(SCRIPT), "--verbose-log", str(p), "--layouts"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert "error: --verbose-log" in err[-1] and expected in err[-1] and str(p) in err[-1]
    assert "Traceback" not in r.stderr


def test_missing_log_and_two_problem_sources_refused(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--verbose-log", str(tmp_path / "nope.log")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.log" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--verbose-log", str(_log(tmp_path)),
                        "--shape", "1,8,8,8,8,3,1,fwd"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give one" in r.stderr


@needs_onednn
def test_any_layout_is_blocked_and_padded():
    """C = 20 is a multiple of neither 8 nor 16: in oneDNN's blocked layout the source is padded
    to a whole channel block — 24 channels where it blocks by 8 (AVX2), 32 where it blocks by 16
    (AVX-512) — so its buffer outgrows the NHWC one (a plain layout would keep the size)."""
    lib, engine, _ = onednn._runtime()
    lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    sizes = {}
    for layout in ("nhwc", "any"):
        pds, _ = onednn._conv_pds(lib, engine, (2, 16, 16, 20), (3, 3, 20, 32), (1, 1),
                                  ((1, 1), (1, 1)), layout)
        md = lib.dnnl_primitive_desc_query_md(pds["fwd"], onednn._Q_SRC_MD, 0)
        sizes[layout] = lib.dnnl_memory_desc_get_size(ctypes.c_void_p(md))
    assert sizes["nhwc"] == 2 * 16 * 16 * 20 * 4
    assert sizes["any"] in (2 * 16 * 16 * 24 * 4, 2 * 16 * 16 * 32 * 4), sizes


@needs_onednn
def test_layouts_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--verbose-log", str(_log(tmp_path, 2)),
                        "--layouts", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "5 problems, 2 executions of the step" in r.stdout
    rows = [ln for ln in r.stdout.splitlines() if re.match(r"\| \d", ln)]
    assert len(rows) == 5
    per = []
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        calls = int(cells[1])
        a, b = (float(c.rsplit(",", 1)[1]) for c in cells[2:4])
        per.append((calls, a, b))
    m = re.search(r"NHWC ([\d.]+) ms, oneDNN's layout ([\d.]+) ms, the faster of the two per "
                  r"problem ([\d.]+) ms", r.stdout)
    assert m, r.stdout
    nhwc, blocked, best = map(float, m.groups())
    assert nhwc == pytest.approx(sum(k * a for k, a, _ in per), abs=0.1 * len(per))
    assert blocked == pytest.approx(sum(k * b for k, _, b in per), abs=0.1 * len(per))
    assert best == pytest.approx(sum(k * min(a, b) for k, a, b in per), abs=0.1 * len(per))
