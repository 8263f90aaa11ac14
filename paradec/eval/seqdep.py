"""SeqDep over a JSONL of texts (``paradec seqdep``): segment each text by a rule, score it with
a causal LM (``paradec.metrics.seqdep``), report the mean and each text's value.

Each line holds ``text`` (or ``segments``, a list of strings, with ``--segment given``) and an
optional ``prompt``. Rules: ``lines`` — split after every newline (a blank line joins the segment
before it); ``sentences`` — split after ``.``, ``!`` or ``?`` followed by whitespace (the
whitespace stays with the sentence it ends); ``given`` — the line's own ``segments``. The
segments always concatenate back to the text. A text with fewer than two segments has no SeqDep
(segments 2..N) and is listed, not scored.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from tqdm import tqdm

from paradec.errors import InputError
from paradec.eval.tasks import DataError
from paradec.metrics import segment_gains

RULES = ("lines", "sentences", "given")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def segment(text: str, rule: str) -> list[str]:
    """The text's segments by ``rule`` (lines or sentences); they concatenate to ``text``."""
    if rule == "lines":
        parts = text.splitlines(keepends=True)
    elif rule == "sentences":
        cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    else:
        raise InputError(f"segment rule must be 'lines' or 'sentences' here, got {rule!r}")
    out: list[str] = []
    for p in parts:
        if out and not p.strip():
            out[-1] += p  # whitespace alone is no segment
        elif p:
            out.append(p)
    if len(out) > 1 and not out[0].strip():  # leading whitespace joins the first segment
        first = out.pop(0)
        out[0] = first + out[0]
    return out


def read_texts(path: Path, rule: str, limit: int | None = None) -> list[tuple[int, str, list[str]]]:
    """(line number, prompt, segments) of each line; a malformed line raises, naming it."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as lines:  # lines end at "\n" only (JSON strings may hold U+2028)
        rows = list(lines)
    for number, line in enumerate(rows, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number} is not JSON ({e.msg})") from None
        key = "segments" if rule == "given" else "text"
        value = row.get(key) if isinstance(row, dict) else None
        ok = (isinstance(value, list) and all(isinstance(s, str) for s in value)) if key == "segments" else isinstance(value, str)
        prompt = row.get("prompt", "") if isinstance(row, dict) else ""
        if not ok or not isinstance(prompt, str):
            raise DataError(f"{path}: line {number} needs {key!r} ({'a list of strings' if key == 'segments' else 'a string'}) "
                            f"and an optional 'prompt' string for --segment {rule}")
        out.append((number, prompt, value if rule == "given" else segment(value, rule)))
        if limit is not None and len(out) == limit:
            break
    if not out:
        raise DataError(f"{path} holds no texts")
    return out


def score(scorer, texts: list[tuple[int, str, list[str]]], progress: bool = True) -> dict:
    """Per-text SeqDep (summed and per token) and their means over the texts that have >= 2 segments."""
    rows, unscored = [], []
    for number, prompt, segments in tqdm(texts, desc="seqdep", disable=not progress):
        if len(segments) < 2:
            unscored.append(number)
            continue
        gains = segment_gains(scorer, segments, prompt)
        rows.append({"line": number, "segments": len(segments),
                     "seqdep": statistics.fmean(g.total for g in gains),
                     "seqdep_per_token": statistics.fmean(g.per_token for g in gains)})
    if not rows:
        raise DataError("no text has two or more segments under this rule; SeqDep needs segments 2..N")
    return {"texts": len(rows), "seqdep": statistics.fmean(r["seqdep"] for r in rows),
            "seqdep_per_token": statistics.fmean(r["seqdep_per_token"] for r in rows),
            "segments": statistics.fmean(r["segments"] for r in rows), "unscored_lines": unscored, "rows": rows}


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="paradec-tiny-scorer", help="the scorer: a causal LM directory or built-in name")
    p.add_argument("--data", type=Path, required=True, help="JSONL: text (or segments) and an optional prompt per line")
    p.add_argument("--segment", choices=RULES, default="lines", help="how a text splits into the segments it scores")
    p.add_argument("--limit", type=int, help="the first N texts")
    p.add_argument("--out", type=Path, help="write each text's SeqDep here (JSONL)")
    p.add_argument("--device", default="cpu", help="where the scorer runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    from paradec.models.ar import ARModel

    texts = read_texts(args.data, args.segment, args.limit)
    result = score(ARModel.load(args.model, device=args.device), texts, progress=not args.no_progress)
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in result["rows"]), encoding="utf-8")
    print(f"SeqDep of {result['texts']} texts ({args.data}, --segment {args.segment}, scorer {args.model}): "
          f"{result['seqdep']:.3f} nats per segment, {result['seqdep_per_token']:.4f} per token; "
          f"{result['segments']:.1f} segments per text")
    if result["unscored_lines"]:
        print(f"  fewer than 2 segments (not scored): lines {result['unscored_lines'][:20]}")
    print(json.dumps({"seqdep": {k: v for k, v in result.items() if k != "rows"}}))
    return 0
