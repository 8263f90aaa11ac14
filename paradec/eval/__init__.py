"""Evaluation: tasks and grading (``tasks``), the eval loop with its results file (``run``),
lm-evaluation-harness's model class (``harness``, needs the ``eval`` extra) and SeqDep over text
files (``seqdep``)."""

from paradec.eval.run import EvalReport, evaluate
from paradec.eval.tasks import TASKS, DataError, Example, get_task, load_examples

__all__ = ["TASKS", "DataError", "EvalReport", "Example", "evaluate", "get_task", "load_examples"]
