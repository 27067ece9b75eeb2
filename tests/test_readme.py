"""The README's Python API example runs as written (in a scratch directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.usefixtures("one_thread")
def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hybridkit").mkdir()  # the example names the shipped recipe by its repo path
    (tmp_path / "hybridkit" / "recipes").symlink_to(ROOT / "hybridkit" / "recipes")
    code = python_block("### Python API")
    # dont_inherit: the block runs as written, without this module's `from __future__` flags.
    exec(compile(code, "README.md (Python API)", "exec", dont_inherit=True), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "step 40: loss" in out and "torch.Size([2, 24])" in out
    run = tmp_path / "runs" / "api-demo"
    payload = json.loads((run / "eval.json").read_text())
    assert [r["length"] for r in payload["results"]] == [32, 64]
    assert {p.name for p in run.iterdir()} >= {"recipe.yaml", "model.safetensors", "eval.png"}


@pytest.mark.usefixtures("one_thread")
def test_readme_models_example_runs(tmp_path, monkeypatch):
    """The "Models" block, pasted as it is, runs (its inputs are defined in the block)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hybridkit").mkdir()
    (tmp_path / "hybridkit" / "recipes").symlink_to(ROOT / "hybridkit" / "recipes")
    code = python_block("### Models")
    scope = {"__name__": "readme"}
    exec(compile(code, "README.md (Models)", "exec", dont_inherit=True), scope)
    assert scope["logits"].shape[:2] == (1, 100) and scope["next_logits"].shape[0] == 2
