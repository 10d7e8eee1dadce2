"""Exporting reviewed synthetic dialogues as training data: chat SFT messages or CRS turns, JSONL
or Parquet. Used through `crs_core.synth`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .catalog import display_title
from .synth_inputs import (N_GROUND_TRUTH, SynthesisError)


# ==============================================================================================
# export
# ==============================================================================================
EXPORT_SHAPES = ("chat", "crs")
EXPORT_FORMATS = ("jsonl", "parquet")


def export_synthetic(
    ws: Any,
    path: str | os.PathLike,
    shape: str = "chat",
    fmt: str | None = None,
    statuses: Sequence[str] | str | None = ("approved",),
    *,
    selection_id: str | None = None,
    include_flagged: bool = False,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Write synthetic queries with their ground truth as training data.

    shape 'chat': ``{"query_id", "messages": [system, user = query, assistant = "1. Title (Year)\\n..."]}``
    (the SFT shape crs_core.train reads; the system prompt is train.DEFAULT_SYSTEM_PROMPT).
    shape 'crs': ``{"query_id", "context": [query], "rec": [item ids], "rec_titles": [...]}``.
    fmt: 'jsonl' or 'parquet' (default from the file suffix, else jsonl). statuses: review
    statuses to include (default approved only; None or 'all' = every status). Hallucinated
    (flagged) titles are left out unless include_flagged (then chat lists them by their raw
    title; 'rec' never has them). Queries without any ground-truth item are skipped. No
    provenance, prompts or keys are written. The file is replaced atomically.
    """
    if shape not in EXPORT_SHAPES:
        raise SynthesisError(f"unknown export shape {shape!r}; use one of {', '.join(EXPORT_SHAPES)}")
    p = Path(path)
    if fmt is None:
        fmt = "parquet" if p.suffix.lower() in (".parquet", ".pq") else "jsonl"
    if fmt not in EXPORT_FORMATS:
        raise SynthesisError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    where, params = [], []
    if isinstance(statuses, str):
        statuses = None if statuses == "all" else (statuses,)
    if statuses is not None:
        statuses = list(statuses)
        if not statuses:
            raise SynthesisError("no review status selected for the export")
        where.append(f"q.status IN ({','.join('?' * len(statuses))})")
        params += statuses
    if selection_id is not None:
        where.append("q.selection_id = ?")
        params.append(selection_id)
    sql = (
        "SELECT q.query_id, q.selection_id, q.item_id AS seed_item, q.query, q.gt_mode, q.status, "
        "g.rank, g.title_raw, g.item_id, g.flagged, i.title, i.year "
        "FROM synthetic_queries q LEFT JOIN ground_truth g ON g.query_id = q.query_id "
        "LEFT JOIN items i ON i.item_id = g.item_id "
        + (f"WHERE {' AND '.join(where)} " if where else "")
        + "ORDER BY q.created_at, q.query_id, g.rank"
    )
    df = ws.df(sql, params)
    from .prompts import DEFAULT_SYSTEM_PROMPT
    from .train_data import format_target

    system = system_prompt or DEFAULT_SYSTEM_PROMPT.replace("{n}", str(N_GROUND_TRUTH))
    records: list[dict[str, Any]] = []
    skipped = 0
    for qid, g in df.groupby("query_id", sort=False):
        first = g.iloc[0]
        query = str(first["query"] or "").strip()
        titles, recs, rec_titles = [], [], []
        for r in g.itertuples(index=False):
            if r.rank is None or pd.isna(r.rank):
                continue
            grounded = r.item_id is not None and not pd.isna(r.item_id) and not bool(r.flagged) and r.title is not None
            if grounded:
                t = display_title(r.title, r.year)
                titles.append(t)
                recs.append(str(r.item_id))
                rec_titles.append(t)
            elif include_flagged and r.title_raw:
                titles.append(str(r.title_raw))
        if not query or not titles or (shape == "crs" and not recs):
            skipped += 1
            continue
        base = {"query_id": str(qid), "selection_id": first["selection_id"], "seed_item": first["seed_item"],
                "gt_mode": first["gt_mode"], "status": first["status"]}
        if shape == "chat":
            records.append({**base, "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": query},
                {"role": "assistant", "content": format_target(titles)},
            ]})
        else:
            records.append({**base, "context": [query], "rec": recs, "rec_titles": rec_titles})
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=str(p.parent))
    os.close(fd)
    try:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            if records:
                table = pa.Table.from_pylist(records)
            else:
                cols = {"query_id": pa.string(), "selection_id": pa.string(), "seed_item": pa.string(),
                        "gt_mode": pa.string(), "status": pa.string()}
                if shape == "chat":
                    cols["messages"] = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
                else:
                    cols.update(context=pa.list_(pa.string()), rec=pa.list_(pa.string()), rec_titles=pa.list_(pa.string()))
                table = pa.schema(list(cols.items())).empty_table()
            pq.write_table(table, tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"path": str(p), "rows": len(records), "skipped": skipped, "shape": shape, "format": fmt}
