"""A rich table of answers, for the command line and the demo."""
from __future__ import annotations

from catcascade.client.results import ClassifyResult


def results_table(rows: list[tuple[str, ClassifyResult]], title: str = "catcascade"):
    """A rich Table: image, ranked labels, escalation, per-stage milliseconds."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("image", "top-3 (probability)", "escalated (reason)", "decode", "cnn queue", "cnn", "vlm", "total ms"):
        t.add_column(col, justify="left" if col[0] in "ite" else "right", no_wrap=col[0] in "ite")
    for name, r in rows:
        top = ", ".join(f"{s.label} {s.probability:.2f}" for s in r.labels)
        esc = ("yes" if r.escalated else "no") + f" ({r.escalation_reason.name.lower()})" + (", cached" if r.cached else "")
        tm = r.timings
        t.add_row(name, top, esc, f"{tm.decode_ms:.1f}", f"{tm.cnn_queue_ms:.1f}", f"{tm.cnn_ms:.1f}",
                  f"{tm.vlm_ms:.1f}", f"{tm.total_ms:.1f}")
    return t
