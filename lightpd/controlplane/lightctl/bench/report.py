"""What a run shows and keeps: the summary table, the JSON file, and two runs side by side."""

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lightpd.controlplane.lightctl.bench.metrics import Summary, summarize, timeline
from lightpd.controlplane.lightctl.bench.record import RequestRecord

FORMAT_VERSION = 1
_LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _rows(summary: Summary) -> list[tuple[str, float, str]]:
    """(label, value, format) of every figure shown."""
    rows = [
        ("requests", summary.num_requests, "d"),
        ("requests completed", summary.num_completed, "d"),
        ("requests failed", summary.num_errors, "d"),
        ("duration, first send to last end (s)", summary.duration_s, ".2f"),
        ("wall time, measured run (s)", summary.wall_s, ".2f"),
        ("wall time, with set-up and warm-up (s)", summary.total_wall_s, ".2f"),
        ("input tokens", summary.total_input_tokens, "d"),
        ("output tokens", summary.total_output_tokens, "d"),
        ("request throughput (req/s)", summary.request_throughput, ".2f"),
        ("input throughput (tok/s)", summary.input_throughput, ".1f"),
        ("output throughput (tok/s)", summary.output_throughput, ".1f"),
        ("total throughput (tok/s)", summary.total_token_throughput, ".1f"),
        ("cached prompt tokens (prefix caches)", summary.total_cached_tokens, "d"),
        ("cached share of prompt tokens", _share(summary.total_cached_tokens, summary), ".3f"),
    ]
    if summary.kv_transfer_tokens is not None:
        per_request = summary.kv_transfer_bytes / max(1, summary.num_completed) / 1e6
        rows += [
            ("prompt tokens sent prefill -> decode", summary.kv_transfer_tokens, "d"),
            ("sent share of prompt tokens", _share(summary.kv_transfer_tokens, summary), ".3f"),
            ("KV sent per request (MB)", per_request, ".2f"),
        ]
    if summary.goodput is not None:
        slo = ",".join(f"{k}={v:g}" for k, v in (summary.slo or {}).items())
        rows += [
            (f"requests within SLO ({slo} ms)", summary.num_good, "d"),
            ("goodput (req/s)", summary.goodput, ".2f"),
        ]
    for key, name in _LATENCIES:
        dist = getattr(summary, key)
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{name} {stat} (ms)", getattr(dist, stat), ".2f"))
    return rows


def _share(tokens: int, summary: Summary) -> float:
    return tokens / summary.total_input_tokens if summary.total_input_tokens else math.nan


def _fmt(value: float, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def summary_table(summary: Summary) -> Table:
    table = Table(show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value, fmt in _rows(summary):
        style = "red" if label == "requests failed" and value else None
        table.add_row(label, _fmt(value, fmt), style=style)
    return table


def error_lines(summary: Summary) -> list[str]:
    """Why requests failed: each distinct error with its count, the most frequent first."""
    if not summary.num_errors:
        return []
    lines = [f"{summary.num_errors} of {summary.num_requests} requests failed:"]
    lines += [f"  {count} x {message}" for message, count in summary.errors.items()]
    shown = sum(summary.errors.values())
    if shown < summary.num_errors:
        lines.append(f"  {summary.num_errors - shown} with other errors")
    return lines


def compare_table(a: Summary, b: Summary, name_a: str, name_b: str) -> Table:
    table = Table()
    table.add_column("metric")
    table.add_column(name_a, justify="right")
    table.add_column(name_b, justify="right")
    table.add_column("B / A", justify="right")
    rows_b = {label: value for label, value, _ in _rows(b)}
    for label, value_a, fmt in _rows(a):
        value_b = rows_b.get(label)
        ratio = "-"
        if value_a and value_b is not None and not math.isnan(value_a) and not math.isnan(value_b):
            ratio = f"{value_b / value_a:.2f}x"
        table.add_row(label, _fmt(value_a, fmt), _fmt(value_b, fmt), ratio)
    return table


def result_json(
    config: dict,
    records: list[RequestRecord],
    slo: dict[str, float] | None,
    summary: Summary | None = None,
) -> dict:
    """The result file's content; ``summary`` when the caller has one (with wall times)."""
    summary = summary or summarize(records, slo=slo)
    return {
        "lightpd_bench": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "summary": summary.to_json(),
        "timeline": timeline(records),
        "requests": [r.to_json() for r in records],
    }


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(result), indent=1, allow_nan=False))


def _finite(value):
    """NaN (a latency of no requests) as null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def load_result(path: Path) -> dict:
    """A result file written by `lightctl bench --out`; ValueError saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("lightpd_bench") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a `lightctl bench` result (format {FORMAT_VERSION})")
    return data


class ProgressView:
    """Progress while running: a live bar on a terminal, else a line per tenth."""

    def __init__(self, console: Console, total: int, label: str = "benchmark") -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.errors = 0
        self.output_tokens = 0
        self.started = time.perf_counter()
        self._next_line = 0.1
        self._bar = None
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}"),
                console=console,
            )
            self._task = self._bar.add_task(label, total=total, stats="")
            self._bar.start()

    def _stats(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.output_tokens / elapsed if elapsed > 0 else 0.0
        return f"errors {self.errors}  output {rate:,.0f} tok/s"

    def restart(self) -> None:
        """Count time from now (the measured run starts after the warm-up)."""
        self.started = time.perf_counter()
        if self._bar is not None:
            self._bar.reset(self._task, total=self.total, stats="")

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.errors += not record.ok
        self.output_tokens += record.output_tokens if record.ok else 0
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, stats=self._stats())
        elif self.done >= self._next_line * self.total or self.done == self.total:
            elapsed = time.perf_counter() - self.started
            self.console.print(
                f"  {self.done}/{self.total} done in {elapsed:.1f} s, {self._stats()}"
            )
            while self._next_line * self.total <= self.done:
                self._next_line += 0.1

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
