"""Grammars compile in a process of their own, bounded in time and memory.

A grammar's compile costs what its text asks for: a probe's 1 MB choice took 118 s
and a 50k-entry enum 1.1 GB. A thread could be neither stopped nor bounded, so the
engine's grammar thread hands each compile to a worker process and waits for it
within ``time_budget_s``, watching the worker's resident memory; past either, the
worker is killed (its CPU and memory come back at once), the request fails with a
reason naming the limit, and the next compile starts a new worker. Results come
back as xgrammar's JSON serialization, which the engine deserializes against its
own tokenizer info; specs go as JSON. Nothing is pickled but the worker's start
arguments, between this process and its own child.
"""

import json
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from lightpd.common.wire.sampling_params import GrammarSpec

POLL_S = 0.02
START_TIMEOUT_S = 120.0  # importing xgrammar and loading the tokenizer
_PAGE = os.sysconf("SC_PAGE_SIZE")


class GrammarLimitError(Exception):
    """A compile went past its time or memory budget (the message names it)."""


class CompileWorker:
    def __init__(self, model_dir: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.args = (model_dir, vocab_size, stop_token_ids)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._baseline_bytes = 0

    def compile(self, spec: GrammarSpec, time_budget_s: float, memory_budget_bytes: int) -> str:
        """The compiled grammar of ``spec``, serialized; raises GrammarLimitError past
        a budget, ValueError with xgrammar's reason if it does not compile."""
        conn = self._ensure_started()
        conn.send_bytes(json.dumps({"kind": spec.kind, "text": spec.text}).encode())
        started = time.monotonic()
        while not conn.poll(POLL_S):
            if not self._process.is_alive():
                self._stop()
                raise GrammarLimitError("the grammar compiler stopped (out of memory?)")
            if time.monotonic() - started > time_budget_s:
                self._stop()
                raise GrammarLimitError(
                    f"the grammar did not compile within {time_budget_s:g} s "
                    "(the compile time limit); simplify the schema, choices or grammar"
                )
            if self._grown_bytes() > memory_budget_bytes:
                self._stop()
                raise GrammarLimitError(
                    f"the grammar needed more than {memory_budget_bytes >> 20} MiB to compile "
                    "(the compile memory limit); simplify the schema, choices or grammar"
                )
        reply = json.loads(conn.recv_bytes())
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["compiled"]

    def close(self) -> None:
        self._stop()

    def _ensure_started(self) -> Connection:
        if self._process is not None and self._process.is_alive():
            return self._conn
        self._stop()
        parent, child = multiprocessing.get_context("spawn").Pipe()
        process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(child, *self.args), name="grammar-compiler", daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        if not parent.poll(START_TIMEOUT_S):
            self._stop()
            raise GrammarLimitError("the grammar compiler did not start")
        parent.recv_bytes()  # ready
        self._baseline_bytes = self._resident_bytes()
        return parent

    def _grown_bytes(self) -> int:
        return self._resident_bytes() - self._baseline_bytes

    def _resident_bytes(self) -> int:
        try:
            return int(Path(f"/proc/{self._process.pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return 0

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=10)
            self._process = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _serve(conn: Connection, model_dir: str, vocab_size: int, stop_token_ids: list[int]) -> None:
    """The worker: compile each spec it is sent, answer with the result or the error."""
    import xgrammar as xgr

    from lightpd.common.engine.grammar import tokenizer_info
    from lightpd.common.grammar_build import build_grammar, describe_error

    compiler = xgr.GrammarCompiler(
        tokenizer_info(model_dir, vocab_size, stop_token_ids), max_threads=1, cache_enabled=False
    )
    conn.send_bytes(b"ready")
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the engine closed or died: so do we
            return
        spec = GrammarSpec(request["kind"], request["text"])
        try:
            compiled = compiler.compile_grammar(build_grammar(spec)).serialize_json()
            reply: dict[str, Any] = {"compiled": compiled}
        except Exception as exc:  # xgrammar's errors: the request's fault
            reply = {"error": describe_error(exc)}
        conn.send_bytes(json.dumps(reply).encode())
