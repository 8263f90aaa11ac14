"""Fixtures shared by the tests of paradec.train, built once for the whole package."""

from __future__ import annotations

import pytest

from paradec.train.recipe import build_task_data
from paradec.train.tasks import arith
from paradec.train.tokenizer import build_word_tokenizer


@pytest.fixture(scope="package")
def task_data(tmp_path_factory):
    """The recipe's tokenizer and both datasets, from 40 problems."""
    root = tmp_path_factory.mktemp("task")
    build_task_data(root, problems=40, workers=1)
    return root


@pytest.fixture(scope="package")
def tok(tmp_path_factory):
    """The task's word tokenizer."""
    return build_word_tokenizer(arith.vocabulary(), tmp_path_factory.mktemp("tok"))
