"""notebooks/moe_llava_colab.ipynb runs top to bottom (tiny settings) and is stored clean.

The notebook is executed with nbclient in a fresh `python3` kernel of this interpreter, from a
temporary copy, with the repository root as the working directory and the environment
variables the notebook reads for CI: no pip install, 1% of the training steps, a workdir
under tmp_path.
"""

import base64
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "moe_llava_colab.ipynb"
CELL_TIMEOUT_S = 600


def cell(nb, cell_id):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def texts(c):
    """Everything a code cell printed or displayed as text / markdown."""
    out = []
    for output in c.outputs:
        if output.output_type == "stream":
            out.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            out.extend(output.data.get(k, "") for k in ("text/markdown", "text/plain"))
    return "\n".join(out)


def pngs(c):
    return [
        base64.b64decode(o.data["image/png"])
        for o in c.outputs
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.data
    ]


def python3_kernel_env(tmp_path):
    """Environment additions that make a `python3` kernel of this interpreter available.

    pip's ipykernel installs that kernelspec into sys.prefix; if it is missing, one is written
    under tmp_path and put on JUPYTER_PATH."""
    specs = KernelSpecManager().find_kernel_specs()
    if "python3" in specs:
        return {}
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter"
    install(kernel_name="python3", prefix=str(prefix))
    return {"JUPYTER_PATH": str(prefix / "share" / "jupyter")}


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [], f"cell {c.get('id')} has stored outputs"
            assert c.execution_count is None, f"cell {c.get('id')} has an execution count"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    copy = tmp_path / "moe_llava_colab.ipynb"
    shutil.copy(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    workdir = tmp_path / "workdir"
    env = {
        "MOE_LLAVA_SKIP_INSTALL": "1",
        "MOE_LLAVA_STEPS_SCALE": "0.01",  # stage steps 2, 12, 3: seconds, not minutes
        "MOE_LLAVA_WORKDIR": str(workdir),
        "MOE_LLAVA_REPO": "",  # inside the repository: nothing may be cloned
        "JAX_PLATFORMS": "cpu",
        **python3_kernel_env(tmp_path),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's default, as in Colab
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(REPO_ROOT)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    for c in nb.cells:
        if c.cell_type == "code":
            errors = [o for o in c.outputs if o.output_type == "error"]
            assert not errors, f"cell {c.get('id')}: {errors}"

    assert f"repository: {REPO_ROOT}" in texts(cell(nb, "setup"))
    assert "MOE_LLAVA_SKIP_INSTALL=1" in texts(cell(nb, "install"))
    assert not (REPO_ROOT / "moe_llava_jax_repo").exists()

    # POPE table after stage 2 and stage 3, shown as markdown.
    pope_text = texts(cell(nb, "pope"))
    assert "| Split | Accuracy |" in pope_text
    for name in ("stage2", "stage3"):
        for split in ("random", "popular", "adversarial"):
            assert f"| {name}/{split} |" in pope_text
    assert (workdir / "pope.md").is_file()

    # Loss curves and the routing heatmap are displayed as PNGs.
    png_magic = b"\x89PNG\r\n\x1a\n"
    loss_pngs = pngs(cell(nb, "loss"))
    assert len(loss_pngs) == 1 and loss_pngs[0].startswith(png_magic)
    routing_pngs = pngs(cell(nb, "routing"))
    assert len(routing_pngs) == 1
    assert routing_pngs[0] == (workdir / "stage3" / "routing" / "routing.png").read_bytes()

    # The held-out image and the model's answers.
    ask = cell(nb, "ask")
    assert len(pngs(ask)) == 1
    ask_text = texts(ask)
    assert "Q: How many objects are there in the image?\nA:" in ask_text
    answers = [line[3:] for line in ask_text.splitlines() if line.startswith("A: ")]
    assert len(answers) >= 4 and any(a.strip() for a in answers), ask_text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
