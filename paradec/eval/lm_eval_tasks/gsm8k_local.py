"""The dataset of ``paradec_gsm8k_local.yaml``: GSM8K's test split shipped inside paradec.

lm-eval imports this file from beside the YAML (``custom_dataset: !function gsm8k_local.dataset``,
lm-eval >= 0.4.9) and calls ``dataset`` with the task's metadata and ``dataset_kwargs`` as
keywords, so the task reads the packaged file from any working directory and from a plain
install. A copy of the YAML (with this file beside it) may name its own file instead:
``dataset_kwargs: {data_files: {test: /abs/path.jsonl}}``.
"""

from __future__ import annotations


def dataset(data_files=None, **_metadata):
    import datasets

    from paradec.eval.tasks import gsm8k_test_path

    return datasets.load_dataset("json", data_files=data_files or {"test": str(gsm8k_test_path())})
