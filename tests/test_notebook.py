"""notebooks/colab_tpu_demo.ipynb runs headless top to bottom (nbclient, a python3
kernel) on the CPU with LAVIDA_NOTEBOOK_SMOKE=1: the install cell sees the package,
training runs 3 steps, the prefix-cache answer and the infilling drafts come out, and
the image is displayed with them (issue 6); the real-model section loads the trained
checkpoint as int8 and answers with the threshold decoder and the dual cache, then
fine-tunes QLoRA adapters on it and answers with them beside the int8 base (issue 15)."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu_demo.ipynb")


def test_notebook_runs_headless_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv("LAVIDA_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("LAVIDA_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # One CPU device, -O0 compiles (4x faster, same numbers), the tests' compile cache.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR",
                     os.path.join(os.environ.get("TMPDIR", "/tmp"), "lavida_jax_jit_cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   resources={"metadata": {"path": ROOT}})
  client.execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "lavida_jax is installed; skipping the install" in text
  assert "backend cpu: 1 x cpu; 3 steps of 8 examples, 56 px" in text
  assert "step 3, loss " in text
  assert "forward passes" in text and "\nA: " in text  # the prefix-cache answer
  assert text.count("(fixed tokens kept: True)") == 2  # the infilling drafts
  # the real-model section's code path, on the demo checkpoint: int8, threshold + dual
  assert "real model: smoke test" in text and "real model: weights int8" in text
  assert "forward passes for 8 tokens" in text
  assert "LoRA: step 3, loss " in text and "adapter step " in text
  assert "before LoRA: '" in text and "after LoRA: '" in text
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(images) == 2  # the image with its answer, then with the drafts
