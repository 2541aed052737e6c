"""The curation report: every record read is accounted for, kept or dropped with a reason."""
from __future__ import annotations

import json
from typing import Dict, Optional

from tidal.data import io as tio


def account(curated, dups: Dict[int, tuple], dedup_stats: Dict, dropped_uri: Optional[str]) -> Dict:
    """Counts per stage and reason, PII per type; optionally the dropped records as JSONL."""
    cols = ["doc_id", "source", "unit", "drop", "pii"] + (["text"] if dropped_uri else [])
    stages: Dict[str, Dict[str, int]] = {}
    pii: Dict[str, int] = {}
    examples, lines, records, kept = [], [], 0, 0
    for row in curated.select_columns(cols).iter_rows():
        records += 1
        drop = row["drop"]
        doc = int(row["doc_id"])
        if not drop and doc in dups:
            kind, rep = dups[doc]
            drop = f"dedup:{kind}"
            row = dict(row, duplicate_of=rep)
        if not drop:
            kept += 1
            for k, v in json.loads(row["pii"]).items():
                pii[k] = pii.get(k, 0) + v
            continue
        stage, reason = drop.split(":", 1)
        stages.setdefault(stage, {})
        stages[stage][reason] = stages[stage].get(reason, 0) + 1
        if len(examples) < 20 and stage == "read":
            examples.append({"source": row["source"], "unit": int(row["unit"]), "error": reason})
        if dropped_uri:
            lines.append(json.dumps({"doc_id": doc, "source": row["source"], "unit": int(row["unit"]),
                                     "reason": drop, "duplicate_of": row.get("duplicate_of"),
                                     "text": row["text"]}))
    if dropped_uri:
        tio.write_bytes(dropped_uri, ("\n".join(lines) + "\n" if lines else "").encode())
    return {"records_in": records, "documents_kept": kept,
            "dropped": {s: dict(sorted(r.items())) for s, r in sorted(stages.items())},
            "dropped_total": records - kept, "pii": dict(sorted(pii.items())),
            "duplicates": dedup_stats, "malformed_examples": examples}


def markdown(report: Dict) -> str:
    lines = ["# Curation report", "", "| stage | reason | records |", "|---|---|---|",
             f"| read | records in | {report['records_in']:,} |"]
    for stage, reasons in report["dropped"].items():
        for reason, n in reasons.items():
            lines.append(f"| {stage} | {reason} | {n:,} |")
    lines.append(f"| **kept** | | **{report['documents_kept']:,}** |")
    if report["pii"]:
        lines += ["", "| PII type | replaced |", "|---|---|"]
        lines += [f"| {k} | {v:,} |" for k, v in report["pii"].items()]
    d = report["duplicates"]
    if d:
        lines += ["", f"Duplicates: {d.get('exact_removed', 0):,} exact copies in "
                      f"{d.get('exact_clusters', 0):,} clusters; {d.get('near_removed', 0):,} near "
                      f"copies in {d.get('near_clusters', 0):,} clusters "
                      f"({d.get('near_candidate_pairs', 0):,} LSH candidate pairs verified)."]
    if "tokens_out" in report:
        lines += ["", f"Tokens out: {report['tokens_out']:,} "
                      f"({report['samples_out']:,} packed samples)."]
    if report.get("stages"):
        lines += ["", "| stage | records | records/s | tokens | tokens/s | seconds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {c['records']:,} | {c['records_per_s']:,.0f} | {c['tokens']:,} | "
                  f"{c['tokens_per_s']:,.0f} | {c['seconds']:.1f} |" for s, c in report["stages"].items()]
    return "\n".join(lines) + "\n"
