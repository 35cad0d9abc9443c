"""The rehearsal's evaluation data: each suite's own data when its root holds it, else stand-ins.

A stand-in is written in the layout the suite's reader declares (one writer per reader, the same
names as the reader registry in ``medclip.evaluation.datasets``): class folders for
``image_folder``, a JSONL or CSV table with the label field for ``jsonl``/``csv``, shards with
``labels`` in ``KEY.json`` for ``wds``. Every class of a dataset gets a few images, so each task
(zero-shot, multilabel, retrieval, linear probe) has what it needs to compute its metrics.
"""

from __future__ import annotations

import csv
import glob
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medclip import jsonio
from medclip.errors import MedclipError

IMAGES_PER_CLASS = 3
RETRIEVAL_IMAGES = 8


@dataclass
class SuiteData:
    name: str
    root: str
    kind: str  # real | stand-in | built by the run
    detail: str


def _source_exists(root: Path | None, source) -> bool:
    if root is None:
        return False
    path = source.args.get("path")
    target = root / path if path else root
    if source.reader == "wds":
        return bool(glob.glob(str(target)))
    return target.exists()


def _rows(spec, pool: list) -> list[tuple[object, str | None, str]]:
    """(PIL image, label or None, caption) for a stand-in of ``spec``."""
    if spec.classes is None:
        return [(pool[i % len(pool)].image, None, pool[i % len(pool)].captions[0]) for i in range(RETRIEVAL_IMAGES)]
    out = []
    for c, label in enumerate(spec.classes.labels):
        for k in range(IMAGES_PER_CLASS):
            record = pool[(c * IMAGES_PER_CLASS + k) % len(pool)]
            out.append((record.image, label, record.captions[0]))
    return out


def write_image_folder(root: Path, args: dict, label: str | None, rows) -> None:
    base = root / (args.get("path") or "")
    for i, (image, value, _) in enumerate(rows):
        folder = base / (value if value is not None else "all")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")


def _table(root: Path, args: dict, label: str | None, rows, default_image_field: str) -> list[dict]:
    file = root / args["path"]
    image_field = args.get("image_field", default_image_field)
    caption_field = args.get("caption_field", "caption")
    images = file.parent / f"{file.stem}-images"
    images.mkdir(parents=True, exist_ok=True)
    table = []
    for i, (image, value, caption) in enumerate(rows):
        image.save(images / f"{i:04d}.png")
        row = {image_field: f"{images.name}/{i:04d}.png"}
        if caption_field:
            row[caption_field] = caption
        if label and value is not None:
            row[label] = value
        table.append(row)
    return table


def write_jsonl(root: Path, args: dict, label: str | None, rows) -> None:
    table = _table(root, args, label, rows, "image")
    (root / args["path"]).write_text("".join(jsonio.dumps(r) + "\n" for r in table))


def write_csv(root: Path, args: dict, label: str | None, rows) -> None:
    table = _table(root, args, label, rows, "path")
    with open(root / args["path"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in table for k in r}))
        writer.writeheader()
        writer.writerows(table)


def write_wds(root: Path, args: dict, label: str | None, rows) -> None:
    from medclip.data.shards import ShardSink

    target = root / args["path"]
    name = target.name.replace("*", "000000").replace("?", "0")
    target.parent.mkdir(parents=True, exist_ok=True)
    sink = ShardSink(target.parent, name.replace("{", "{{").replace("}", "}}"))
    for i, (image, value, caption) in enumerate(rows):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        meta = {"captions": [caption], "labels": {label: value} if label and value is not None else {}}
        sink.write(f"standin{i:06d}", {"png": buf.getvalue(), "json": jsonio.dumps(meta).encode(),
                                       "txt": caption.encode()})
    sink.close()


WRITERS: dict[str, Callable] = {"image_folder": write_image_folder, "jsonl": write_jsonl, "csv": write_csv,
                                "wds": write_wds}


def write_stand_in_dataset(spec, root: Path, pool: list) -> None:
    rows = _rows(spec, pool)
    for source in (spec.source, spec.train, spec.val):
        if source is None:
            continue
        writer = WRITERS.get(source.reader)
        if writer is None:
            raise MedclipError(f"dataset {spec.name}: the rehearsal has no stand-in writer for reader "
                               f"{source.reader!r} (known: {', '.join(WRITERS)})")
        if not _source_exists(root, source):
            writer(root, source.args, spec.label, rows)


def prepare_eval_data(values: dict, eval_dir: Path, pool: list) -> list[SuiteData]:
    """Give the rehearsed recipe's suites data (edits ``values['eval']`` in place)."""
    from medclip.evaluation.suites import load_suite

    section = values["eval"]
    suites = [load_suite(name) for name in section.get("suites") or []]
    root = section.get("root")
    if root and "{output_dir}" in root:  # data the run itself builds (the demo set)
        return [SuiteData(s.name, root, "built by the run", f"{len(s.datasets)} datasets") for s in suites]
    found, missing = [], []
    for suite in suites:
        suite_root = Path(root) if root else suite.root
        absent = [d.name for d in suite.datasets
                  if not all(_source_exists(suite_root, s) for s in (d.source, d.train, d.val) if s is not None)]
        if absent:
            missing.append((suite, absent))
        else:
            found.append(SuiteData(suite.name, str(suite_root), "real", f"{len(suite.datasets)} datasets under {suite_root}"))
    if not missing:
        return found
    # eval.root is one directory for every suite: once one needs stand-ins, all are written there.
    stand_in_root = eval_dir / "suites"
    for suite in suites:
        for spec in suite.datasets:
            write_stand_in_dataset(spec, stand_in_root, pool)
    section["root"] = str(stand_in_root)
    reasons = {s.name: a for s, a in missing}

    def why(suite) -> str:
        if suite.name not in reasons:
            return " (another suite of the recipe needed stand-ins)"
        where = Path(root) if root else suite.root
        place = f"under {where}" if where else "(no eval.root in the recipe, no root in the suite)"
        return f" (not found: {_preview(reasons[suite.name])} {place})"

    return [SuiteData(s.name, str(stand_in_root), "stand-in", f"{len(s.datasets)} datasets written as stand-ins"
                      + why(s)) for s in suites]


def _preview(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
