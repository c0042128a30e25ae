"""Committed notebooks are stripped, runbooks have one parameters cell, and nothing looks like a secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridgekit.runbooks.secrets import check_notebook, find_secrets

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = sorted((ROOT / "runbooks").glob("*.ipynb"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_to_check() -> None:
    assert RUNBOOKS, "runbooks/ has no notebooks"


@pytest.mark.parametrize("path", RUNBOOKS + NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_notebook_is_clean(path: Path) -> None:
    assert check_notebook(path, runbook=path in RUNBOOKS) == []


def _nb(cells: list[dict[str, object]]) -> dict[str, object]:
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                       "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}


def _code(src: str, tags: list[str] | None = None, outputs: list[object] | None = None) -> dict[str, object]:
    return {"cell_type": "code", "source": src, "metadata": {"tags": tags or []}, "outputs": outputs or [],
            "execution_count": None}


def test_checker_catches_outputs_params_and_secrets(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ipynb"
    bad.write_text(json.dumps(_nb([
        _code("profile: str = 'emulator'  # profile", ["parameters"]),
        _code("profile = 'x'", ["parameters"]),
        _code("print(1)", outputs=[{"output_type": "stream", "name": "stdout", "text": "1"}]),
        _code('client_secret = "Abc8Q~abcdefghijklmnopqrstuvwxyz0123456"'),
    ])))
    problems = "\n".join(check_notebook(bad, runbook=True))
    assert "2 cells tagged 'parameters'" in problems
    assert "has outputs" in problems
    assert "looks like a secret" in problems
    good = tmp_path / "good.ipynb"
    good.write_text(json.dumps(_nb([_code("profile: str = 'emulator'  # profile", ["parameters"])])))
    assert check_notebook(good, runbook=True) == []


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123",
        "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3gifQ.c2lnbmF0dXJlc2lnbmF0dXJl",
        "password = 'correct-horse'",
        "-----BEGIN PRIVATE KEY-----",
        "abc8Q~abcdefghijklmnopqrstuvwxyz01234567",
    ],
)
def test_secret_shapes(text: str) -> None:
    assert find_secrets(text)


def test_literal_secret_values_and_clean_text() -> None:
    assert find_secrets("the value is s3cr3t-v4lue", literals=["s3cr3t-v4lue"])
    assert find_secrets("profile: str = 'emulator'  # which profile to use") == []
