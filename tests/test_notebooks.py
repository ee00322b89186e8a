"""The Colab notebooks run top to bottom (papermill, this venv's Python as the kernel) on the CPU
with tiny settings: ``colab/train_tpu.ipynb`` trains the demo recipe (``demo_ns``) with the small
Ns-shaped test network of ``train_setup.py`` (a config file given as ``CONFIG``, as a user passes
their own) for 2 steps at 64×64 on ``demo:64``, shows curves and predictions, resumes for 1 more step, then trains on
"own data" (the demo folder read as COCO); ``colab/eval_export.ipynb`` evaluates that run, exports
it to ONNX and OpenVINO (an FP16 IR), checks both against JAX inside the notebook (it raises on a
mismatch) and predicts with the exported model. A cell that raises fails the test (papermill
``PapermillExecutionError``). The repository copies must carry no outputs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

from train_setup import TINY_MODEL_LINES, write_tiny_config

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("train_tpu.ipynb", "eval_export.ipynb")
KERNEL = "damo-jax-test-venv"
CELL_TIMEOUT = 1200
# the notebooks' CONFIG / OWN_CONFIG: the demo recipe with the small test network (the released
# networks have golden tests; compiling the full Ns step was most of this test's time)
NB_CONFIG = '''"""demo_ns with the small Ns-shaped test network (tests/test_notebooks.py)."""
from pathlib import Path

from damo_jax.config import load_config


def get_config():
    c = load_config("demo_ns")
''' + TINY_MODEL_LINES + '''    return c
'''


def test_notebooks_are_stripped_and_parameterised():
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "colab" / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
            f"{name}: outputs must be stripped"
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "INSTALL = True" in tagged[0].source, name
        assert "YOUR_ORG" not in json.dumps(nb)


def test_kernel_never_takes_the_accelerator_and_commands_get_the_runtime_env():
    """A TPU admits one process: the notebook kernel must not initialise JAX on it, or the
    ``damo-jax`` subprocesses (which train and evaluate) would find it taken and fall back to the
    CPU. So the kernel pins its own JAX to the CPU before any JAX / damo_jax import, keeps the
    runtime's environment for the commands, asks for the devices in a subprocess, and every
    command gets that environment."""
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "colab" / name, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        pin = code.index('os.environ["JAX_PLATFORMS"] = "cpu"')
        assert code.index("CLI_ENV = dict(os.environ)") < pin, name
        for first_use in ("import jax", "from damo_jax", "import damo_jax"):
            at = code.find(first_use)
            assert at == -1 or at > pin, (name, first_use)
        assert "jax.devices()" not in code.replace('"count=jax.device_count(), devices=[str(d) for d in jax.devices()]', ""), name
        assert "jax.device_count()" not in code.replace("count=jax.device_count()", ""), name
        assert code.count("env=CLI_ENV") == 2, name        # the device query and damo()
        assert "read1(" in code, name                      # progress bars: '\r' reaches the output


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for THIS interpreter (no user-level install), CPU-only JAX, a private XLA cache."""
    base = tmp_path_factory.mktemp("nb")
    spec_dir = base / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "damo_jax test venv", "language": "python"}))
    env = {"JUPYTER_PATH": str(base / "jupyter"), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(base / "xla"), "PYTHONUNBUFFERED": "1",
           "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("XLA_FLAGS", None)
    yield base
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _execute(name: str, workdir: Path, parameters: dict) -> float:
    import papermill as pm
    t0 = time.perf_counter()
    pm.execute_notebook(str(ROOT / "colab" / name), str(workdir / f"executed_{name}"), parameters=parameters,
                        kernel_name=KERNEL, cwd=str(workdir), execution_timeout=CELL_TIMEOUT,
                        progress_bar=False, log_output=False)
    return time.perf_counter() - t0


def test_notebooks_execute_on_cpu(kernel_env):
    from damo_jax.data_pipelines.demo import ensure_demo
    work = kernel_env / "run"
    work.mkdir()
    own = f"coco:{ensure_demo(64)}"        # the demo folder is a COCO layout: the 'own data' path
    config = str(write_tiny_config(kernel_env, "nb_tiny.py", NB_CONFIG))
    t_train = _execute("train_tpu.ipynb", work, dict(
        INSTALL=False, CONFIG=config, DATA="demo:64", WORKDIR="runs/nb_demo", IMG_SIZE=64, BATCH_SIZE=4,
        MAX_STEPS=2, RESUME_STEPS=1, EXTRA=["--no-progress", "--config.data.workers=0"],
        OWN_DATA=own, OWN_CONFIG=config, OWN_WORKDIR="runs/nb_own",
        OWN_EXTRA=["--no-progress", "--config.data.workers=0"]))
    run = work / "runs" / "nb_demo"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 3      # 2 steps + 1 resumed
    assert (work / "runs" / "nb_own" / "curves.png").is_file()
    t_eval = _execute("eval_export.ipynb", work, dict(
        INSTALL=False, CHECKPOINT="runs/nb_demo", DATA="demo:64", IMG_SIZE=64, OUT_DIR="exported",
        NUM_IMAGES=2, FP16=True))     # the ONNX file is checked at the float32 tolerances, the IR at FP16's
    for f in ("model.onnx", "model.xml", "stats_jax.json", "stats_openvino.json"):
        assert (work / "exported" / f).is_file(), f
    print(f"notebook run time: train_tpu {t_train:.0f} s, eval_export {t_eval:.0f} s")


def test_each_training_run_gets_its_own_configs_batch():
    """The own-data run trained with the demo config's batch (``--config ns`` with
    ``--config.train.batch_size=8`` where ns's own is 256: a ~32x smaller learning rate), against
    the parameter comment "BATCH_SIZE 0: the config's". The training cell's ``train_args``, run
    with the parameters' defaults on 8 devices, now gives each config its own batch."""
    from damo_jax.config import load_config
    nb = nbformat.read(ROOT / "colab" / "train_tpu.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "def train_args" in c.source)
    namespace = {"JAX_INFO": {"count": 8}, "BATCH_SIZE": 0, "IMG_SIZE": 0, "CONFIG": "demo",
                 "DATA": "demo", "WORKDIR": "w", "MAX_STEPS": 0, "EXTRA": [],
                 "damo": lambda *args: args}
    exec(cell, namespace)
    for config in ("demo", "ns", "s"):
        args = namespace["train_args"](config, "demo", "w", 0, [])
        want = -(-int(load_config(config).train.batch_size) // 8) * 8
        assert f"--config.train.batch_size={want}" in args, (config, args)
    namespace["BATCH_SIZE"] = 12                                  # given: the same for every run
    assert "--config.train.batch_size=16" in namespace["train_args"]("ns", "demo", "w", 0, [])
