"""The evaluate stage's bookkeeping on known numbers: parent labels from the lock, the DVC plot rows, the MLflow
metric names and the one-line summary (the scores themselves are tested in tests/test_evaluate.py)."""

from __future__ import annotations

import csv
from pathlib import Path

from mergelib.pipeline.eval_step import family_labels, flat_metrics, summary_line, write_skill_rows
from mergelib.pipeline.fetch import LockedModel

DOC = {
    "merged": {"demo_add": {"exact_match": 0.7, "samples": 200}, "demo_ppl": {"bits_per_byte": 1.5}},
    "parents": {
        "base": {"demo_add": {"exact_match": 0.0, "samples": 200}, "demo_ppl": {"bits_per_byte": 1.25}},
        "ft_add": {"demo_add": {"exact_match": 1.0, "samples": 200}, "demo_ppl": {"bits_per_byte": 1.75}},
    },
    "summary": {"merged": {"exact_match_mean": 0.7}},
}


def test_family_labels_from_the_lock():
    refs = ("models/demo/base", "models/demo/ft_add", "Qwen/Qwen2.5-0.5B-Instruct@7ae5")
    lock = {r: LockedModel(r, "demo", r, f"/data/{i}") for i, r in enumerate(refs)}
    assert family_labels(refs, lock) == {"base": Path("/data/0"), "ft_add": Path("/data/1"),
                                         "Qwen2.5-0.5B-Instruct": Path("/data/2")}


def test_skill_rows_hold_every_accuracy_and_nothing_else(tmp_path):
    rows = list(csv.DictReader(open(write_skill_rows(DOC, tmp_path / "rows.csv"))))
    assert [(r["model"], r["task"], r["label"], float(r["accuracy"])) for r in rows] == [
        ("base", "demo_add", "demo_add / base", 0.0),
        ("ft_add", "demo_add", "demo_add / ft_add", 1.0),
        ("merged", "demo_add", "demo_add / merged", 0.7),
    ]


def test_flat_metrics_and_summary():
    assert flat_metrics(DOC) == {
        "eval.base.demo_add.exact_match": 0.0, "eval.base.demo_ppl.bits_per_byte": 1.25,
        "eval.ft_add.demo_add.exact_match": 1.0, "eval.ft_add.demo_ppl.bits_per_byte": 1.75,
        "eval.merged.demo_add.exact_match": 0.7, "eval.merged.demo_ppl.bits_per_byte": 1.5,
        "eval.merged.exact_match_mean": 0.7,
    }
    assert summary_line(DOC) == "demo_add 0.70 (ft_add 1.00)"
    assert summary_line({"merged": {"demo_ppl": {"bits_per_byte": 1.0}}}) == "no accuracy task"
