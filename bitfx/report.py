"""Log what the backend decided for each saved tensor (``options={"report": True}``)."""

from __future__ import annotations

import logging

from tabulate import tabulate

from .passes.analysis import SavedTensor, summarize

log = logging.getLogger("bitfx")


def decisions_table(infos: list[SavedTensor]) -> str:
    rows = [
        [i.module_path or i.node.name, i.node.name, "x".join(str(s) for s in i.val.shape),
         str(i.val.dtype).replace("torch.", ""), i.dense_bytes(), i.stored_bytes(), i.decision.value, i.reason]
        for i in infos
    ]
    return tabulate(rows, headers=["module", "node", "shape", "dtype", "dense B", "predicted B", "decision", "why"],
                    disable_numparse=True)


def log_decisions(infos: list[SavedTensor]) -> None:
    dense = sum(i.dense_bytes() for i in infos)
    stored = sum(i.stored_bytes() for i in infos)
    log.info(
        "bitfx: %s; saved %d -> %d bytes predicted at default densities\n%s",
        summarize(infos), dense, stored, decisions_table(infos),
    )
