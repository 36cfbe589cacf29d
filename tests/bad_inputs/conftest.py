"""Fixtures of the bad-input corpus: the files, built once, and a fresh copy of them per case."""

import shutil
from pathlib import Path

import pytest
from bad_files import make_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def workdir(corpus_dir, tmp_path, monkeypatch) -> Path:
    """A copy of the corpus as the current folder (factories in it importable, like `python -m`)."""
    work = tmp_path / "work"
    shutil.copytree(corpus_dir, work)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.delitem(__import__("sys").modules, "my_models", raising=False)
    return work
