"""The Colab notebook runs top to bottom with tiny settings (nbclient, a fresh kernel) and writes real results."""

import json
import os
import pathlib

import nbclient
import nbformat

from ipo_jax import data as data_lib
from tests.conftest import source_path

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "colab_ipo_jax.ipynb"


def test_notebook_executes(tmp_path, monkeypatch):
  source_path("allenai/reward-bench", split="filtered")  # the notebook's data, or a skip with the reason
  source_path("tatsu-lab/alpaca_eval", split="eval", name="alpaca_eval")
  monkeypatch.setenv("IPO_JAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("IPO_JAX_NOTEBOOK_OUTPUT", str(tmp_path))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  outputs = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in notebook.cells
             if cell.cell_type == "code"]
  assert "prefers chosen:" in "".join(outputs)
  rb = json.loads((tmp_path / "rewardbench" / "summary.json").read_text())
  assert rb["counts"]["pairs"] == 2 and 0.0 <= rb["score"] <= 1.0
  rounds = json.loads((tmp_path / "self_improve" / "rounds.json").read_text())["rounds"]
  assert [r["round"] for r in rounds] == [0, 1]
  assert rounds[0]["win_rate"] == 0.5 and rounds[0]["rewardbench_pairs"] == 2
  pairs = list(data_lib.iter_jsonl(tmp_path / "self_improve" / "round_1" / "pairs.jsonl"))
  assert pairs and all(p["chosen"] != p["rejected"] and p["chosen_score"] >= p["rejected_score"] for p in pairs)
  assert (tmp_path / "self_improve" / "round_1" / "policy" / "config.json").exists()
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for cell in notebook.cells for o in cell.get("outputs", []))
  assert os.path.exists(tmp_path / "self_improve" / "rounds.png")
