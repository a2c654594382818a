"""Structured logs: one line per event, ``ts=... level=... logger=... msg="..."``.

Callers log ``"what happened key=value key=value"``; this formatter adds time, level and
logger and quotes the text before the first ``key=value`` so a line parses as logfmt.
"""

from __future__ import annotations

import logging
import sys
import time


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        words = record.getMessage().split(" ")
        split = next((i for i, word in enumerate(words) if "=" in word), len(words))
        text, fields = " ".join(words[:split]), " ".join(words[split:])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f'ts={stamp} level={record.levelname.lower()} logger={record.name} msg="{text}"'
        if fields:
            line += " " + fields
        if record.exc_info:
            line += " error=" + repr(self.formatException(record.exc_info))
        return line


def setup(level: str = "warning", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and aetcd are chatty at info level about reconnects we already report.
    logging.getLogger("aetcd").setLevel(logging.ERROR)
