"""Expert parallelism: N engines, one per device, share every MoE layer's experts;
each keeps its own requests and KV (data-parallel attention).

Each member holds the attention and dense weights and 1/N of each MoE layer's
experts (``MoEExperts`` built with ``local_experts``; the loader never reads the
others' tensors). At each MoE layer the members exchange tokens: every member's
hidden states and router logits are all-gathered, each member runs its own
experts on all the group's tokens (the fused kernel with an expert map: tokens
routed elsewhere contribute zero), and a reduce-scatter sums the shares and hands
each member its own tokens' rows. Models stay parallel-free: ``attach`` puts an
``ExpertExchange`` in front of each layer's experts.

Lockstep: collectives pair up in the order they are issued, so every member
joins every step. A step begins with an agreement (an all-gather of each
member's token count and whether it decodes, on a Gloo group of its own); the
exchanges then pad every member's rows to the largest count. A member with
nothing to run takes part in the step's exchanges with zero tokens
(``empty_step``); when no member has anything, no exchange runs and each waits in
its own loop (a node's idle poll) before it agrees again, so an idle group costs
one small collective per poll.

CUDA graphs: when every member decodes (or idles), all replay the decode graph of
the same size, the smallest that fits the largest count, so the exchanges inside
it are fixed-size: every member's rows (its requests, then the graph's padding
request) are gathered and every member's experts run on all of them. Graphs are
captured by every member together, in the same order (``uniform_step``), as the
capture runs the collectives.

Failure: every collective is bounded by ``timeout_s`` (Gloo's timeout; on GPUs
the step, eager or replayed, is polled to a deadline before its host sync). A
member that dies closes its sockets and the others see it at once; one that
hangs is found at the timeout. Either way the group is aborted on every member
that notices, never waited on, which makes the rest fail too, and
``ExpertParallelError`` tells each engine to end its requests (``Lockstep``, the
engine's side of the group's steps).

Who may join: the rendezvous store's keys live under a prefix derived from the
cluster token, so a process without it can neither join nor learn where the
members listen. Members also check that they all serve the same model.
"""

import datetime
import hashlib
import hmac
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from lightpd.common.engine.config import ExpertParallelConfig
from lightpd.common.engine.model_config import ModelConfig
from lightpd.common.engine.models.moe import MoEExperts, SparseMoeBlock
from lightpd.common.engine.nccl_env import let_failed_communicators_abort

logger = logging.getLogger(__name__)

_LABEL = b"lightpd expert parallel v1"
TEARDOWN_WAIT_S = 10.0  # how long a failed member waits for the group's teardown


class ExpertParallelError(RuntimeError):
    """The group failed (a member died, hung or went out of step); it serves no more."""


class ExpertParallelGroup:
    """This member's side of the group: its share of the experts, the collectives."""

    def __init__(self, config: ExpertParallelConfig, device: torch.device) -> None:
        self.config = config
        self.size, self.rank = config.size, config.rank
        self.device = device
        self.failure: str | None = None
        # Every member's token count in the step under way (after ``agree``).
        self.token_counts: list[int] = [0] * self.size
        # Whether every member decodes (or idles) in it: it may replay a graph.
        self.all_decoding = False
        self._layers: list[MoEExperts] = []  # in the order the forward meets them
        self._exchanges = 0  # exchanges run in the step under way
        self._rows: torch.Tensor | None = None  # real rows among the gathered ones
        self._control = None  # Gloo: the agreements
        self._data = None  # the exchanges: NCCL between GPUs, else the Gloo group
        self._unfinished = False  # NCCL: the step ran exchanges, not polled yet
        self._store = None  # the rendezvous (member 0 serves it), kept while the group lives
        # Destroy the CUDA graphs that captured the exchanges (``before_abort``); run
        # before an abort, and before the communicator goes with this object.
        self._releases: list[Callable[[], object]] = []
        weakref.finalize(self, _release_all, self._releases)

    @property
    def active(self) -> bool:
        """Whether the step under way computes anything on any member."""
        return any(self.token_counts)

    @property
    def step_done(self) -> bool:
        """Whether this member has run every exchange of the step under way (a step
        that fails after that leaves the group in step)."""
        return not self.active or self._exchanges == len(self._layers)

    # ---- building ----

    def shard(self, model_config: ModelConfig) -> ModelConfig:
        """``model_config`` with this member's share of each MoE layer's experts."""
        moe = model_config.moe
        if moe is None:
            raise ValueError(
                f"{model_config.architecture} has no experts to share: expert parallelism "
                "is for MoE models"
            )
        local = self.config.local_experts(moe.num_experts)
        return replace(model_config, moe=replace(moe, local_experts=local))

    def attach(self, model: nn.Module) -> None:
        """Route each MoE layer's experts of ``model`` (built from ``shard``'s config,
        weights loaded) through the group's exchange."""
        blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        for block in blocks:
            self._layers.append(block.experts)
            block.experts = ExpertExchange(block.experts, self)

    def join(self, identity: str) -> None:
        """Meet the other members (each waits up to ``join_timeout_s`` for the rest),
        check that all serve ``identity`` (the model and dtype), build the groups."""
        config = self.config
        wait = datetime.timedelta(seconds=config.join_timeout_s)
        host, port = config.store_address
        try:
            store = dist.TCPStore(
                host, port, is_master=self.rank == 0, timeout=wait, wait_for_workers=False
            )
            store = dist.PrefixStore(f"lightpd-ep/{_namespace(config)}/", store)
            if store.add(f"rank/{self.rank}", 1) != 1:
                raise ExpertParallelError(f"another process joined as rank {self.rank}")
            store.set(f"member/{self.rank}", identity)
            for rank in range(self.size):
                theirs = store.get(f"member/{rank}").decode()
                if theirs != identity:
                    raise ExpertParallelError(
                        f"member {rank} serves {theirs}, this member (rank {self.rank}) "
                        f"serves {identity}: a group serves one model in one dtype"
                    )
            self._control = _gloo_group(dist.PrefixStore("control/", store), config, wait)
            self._data = self._control
            if self.device.type == "cuda":
                self._data = _nccl_group(dist.PrefixStore("data/", store), config, self.device)
            # A first collective on each, under the join timeout: everyone is connected.
            self._control.allreduce([torch.zeros(1)]).wait()
            if self._data is not self._control:
                self._data.allreduce([torch.zeros(1, device=self.device)]).wait()
                torch.cuda.synchronize(self.device)
            self._store = store
        except ExpertParallelError as exc:
            self.fail(str(exc))
        except Exception as exc:  # the store unreachable, a member that never came
            self.fail(f"could not form the group at {config.init}: {exc}")
        timeout = datetime.timedelta(seconds=config.timeout_s)
        for group in {id(g): g for g in (self._control, self._data)}.values():
            if hasattr(group, "_set_default_timeout"):
                group._set_default_timeout(timeout)
        local = config.local_experts(self._layers[0].num_experts) if self._layers else range(0)
        logger.info(
            "joined expert-parallel group %s as rank %d of %d, holding experts %d..%d "
            "of each MoE layer",
            config.init,
            self.rank,
            self.size,
            local.start,
            local.stop - 1,
        )

    # ---- a step ----

    def agree(self, num_tokens: int, decoding: bool = False) -> list[int]:
        """Begin a step: every member's token count; all pad their rows to the largest.
        ``decoding``: this member's step is a decode batch, or nothing."""
        self._check()
        mine = torch.tensor([num_tokens, decoding])
        counts = torch.empty(self.size * 2, dtype=torch.int64)
        self._wait(self._control._allgather_base(counts, mine))
        counts = counts.view(self.size, 2)  # (N, 2): tokens, decoding
        self.token_counts = counts[:, 0].tolist()
        self.all_decoding = bool(counts[:, 1].all())
        self._exchanges = 0
        padded = max(self.token_counts)
        self._rows = None
        if sum(self.token_counts) < self.size * padded:
            # Each member's block of the gathered rows is padded to the largest count.
            self._rows = torch.cat(
                [torch.arange(n) + r * padded for r, n in enumerate(self.token_counts)]
            ).to(self.device)
        return self.token_counts

    def smallest(self, value: int) -> int:
        """The smallest of every member's ``value`` (outside a step): settings that
        must be the same on all, such as the largest decode graph."""
        self._check()
        values = torch.empty(self.size, dtype=torch.int64)
        self._wait(self._control._allgather_base(values, torch.tensor([value])))
        return int(values.min())

    @contextmanager
    def uniform_step(self, num_tokens: int) -> Iterator[None]:
        """A step of ``num_tokens`` rows on every member, known to all without an
        agreement: a decode graph's warm-up or capture, which every member runs with
        the same sizes in the same order. Its exchanges take all rows, none picked."""
        self._check()
        self.token_counts, self._exchanges, self._rows = [num_tokens] * self.size, 0, None
        try:
            yield
            self.finish_step()  # a capture ran nothing: only a warm-up is polled
        finally:
            self.token_counts = [0] * self.size

    def exchange(
        self, hidden: torch.Tensor, router_logits: torch.Tensor, experts: MoEExperts
    ) -> torch.Tensor:
        """One MoE layer for this member's tokens, hidden [T, H] and router_logits [T, E]
        (T as agreed): the sum of every member's share of the layer, [T, H]."""
        self._check()
        num_tokens, hidden_size = hidden.shape
        if num_tokens != self.token_counts[self.rank]:
            self.fail(
                f"an MoE layer ran {num_tokens} tokens in a step agreed at "
                f"{self.token_counts[self.rank]} (a forward outside the group's lockstep)"
            )
        padded = max(self.token_counts)
        # (T_pad, H + E): hidden states and router logits travel in one message.
        send = torch.cat([hidden, router_logits.to(hidden.dtype)], dim=1)
        if padded > num_tokens:
            send = torch.nn.functional.pad(send, (0, 0, 0, padded - num_tokens))
        gathered = hidden.new_empty(self.size * padded, send.shape[1])  # (N * T_pad, H + E)
        self._wait(self._data._allgather_base(gathered, send), on_device=True)
        real = gathered if self._rows is None else gathered[self._rows]  # (sum T, H + E)
        # Row-strided views: the experts read rows by their stride.
        share = experts(real[:, :hidden_size], real[:, hidden_size:])  # (sum T, H)
        if self._rows is not None:
            share = hidden.new_zeros(self.size * padded, hidden_size).index_copy_(
                0, self._rows, share
            )
        out = hidden.new_empty(padded, hidden_size)  # (T_pad, H) summed over the members
        self._wait(self._data._reduce_scatter_base(out, share.contiguous()), on_device=True)
        self._exchanges += 1
        return out[:num_tokens]

    def empty_step(self) -> None:
        """Take part in the step's exchanges with no tokens of this member's own."""
        for experts in self._layers:
            weight = experts.w13
            hidden = weight.new_empty(0, weight.shape[2])
            self.exchange(hidden, weight.new_empty(0, experts.num_experts), experts)
        self.finish_step()

    def finish_replay(self) -> None:
        """The step's exchanges were launched in a replayed decode graph: wait for
        them as ``finish_step`` does, then count them as run."""
        self._unfinished = self._data is not self._control
        self.finish_step()
        self._exchanges = len(self._layers)

    def finish_step(self) -> None:
        """Wait, bounded, until the step's exchanges are done. Gloo has waited for each
        already; NCCL's run on the device, so the work queued so far is polled here,
        and a host sync after it (sampling) cannot hang on a dead member."""
        if not self._unfinished:
            return
        self._unfinished = False
        done = torch.cuda.Event()
        done.record()
        deadline = time.monotonic() + self.config.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                self.fail(f"an exchange took more than {self.config.timeout_s:g} s")
            time.sleep(0)  # yields: a sleep would overshoot the step's end by ~0.1 ms

    # ---- failure ----

    def before_abort(self, release: Callable[[], object]) -> None:
        """Have ``release`` destroy the CUDA graphs that captured this group's
        collectives before the group is aborted: NCCL's abort waits until every such
        graph is gone (a replay stuck on a dead member ends once it is aborted)."""
        self._releases.append(release)

    def _wait(self, work, on_device: bool = False) -> None:
        try:
            work.wait()  # Gloo: done (or past its timeout); NCCL: ordered on this stream
        except Exception as exc:  # a member died or hung, or the group was aborted
            self.fail(f"a collective failed (a member died or hangs): {_describe(exc)}")
        # NCCL's work runs on the device; captured in a graph, at its replays, which
        # ``finish_replay`` polls.
        nccl = on_device and self._data is not self._control
        if nccl and not torch.cuda.is_current_stream_capturing():
            self._unfinished = True

    def _check(self) -> None:
        if self.failure is not None:
            raise ExpertParallelError(self.failure)

    def fail(self, reason: str) -> NoReturn:
        self.abort(reason)
        raise ExpertParallelError(reason)

    def abort(self, reason: str) -> None:
        """Tear the group down without waiting on it; the members still in it see
        their next collective fail at once."""
        if self.failure is None:
            self.failure = reason
            logger.error(
                "expert-parallel group %s (rank %d of %d) failed: %s",
                self.config.init,
                self.rank,
                self.size,
                reason,
            )
        groups = {id(g): g for g in (self._control, self._data) if g is not None}
        releases, self._releases[:] = list(self._releases), []
        self._control = self._data = self._store = None
        self._unfinished = False

        def tear_down() -> None:
            # The communicators first: a graph replay stuck in an exchange with a dead
            # member holds its stream, and destroying that graph waits for it (seen
            # on H200s); the abort is what ends the stuck kernels.
            for group in groups.values():
                try:
                    group.abort()
                except Exception:  # already broken: nothing more to release
                    logger.debug("aborting the expert-parallel group", exc_info=True)
            _release_all(releases)

        # On a thread, bounded: whatever the driver does, this member goes on to end
        # its requests (and a node then exits).
        worker = threading.Thread(target=tear_down, name="ep-teardown", daemon=True)
        worker.start()
        worker.join(TEARDOWN_WAIT_S)
        if worker.is_alive():
            logger.error(
                "tearing the expert-parallel group down did not finish within %g s; "
                "going on without it",
                TEARDOWN_WAIT_S,
            )


class ExpertExchange(nn.Module):
    """A layer's experts behind the group's exchange: this member's tokens in, the
    whole layer's output for them out."""

    def __init__(self, experts: MoEExperts, group: ExpertParallelGroup) -> None:
        super().__init__()
        self.experts = experts
        self.group = group

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.group.exchange(hidden, router_logits, self.experts)


def _release_all(releases: list[Callable[[], object]]) -> None:
    while releases:
        try:
            releases.pop()()
        except Exception:  # the device is broken: what follows goes on regardless
            logger.debug("releasing CUDA graphs", exc_info=True)


def _describe(exc: Exception) -> str:
    """Gloo's message without its source location and its closing advice."""
    text = re.sub(r"^\[[^\]]*\] ", "", str(exc).strip())
    return text.split(". This is typically")[0]


def _namespace(config: ExpertParallelConfig) -> str:
    """The store prefix of the group: only holders of the cluster token know it."""
    message = _LABEL + f" {config.init} {config.size}".encode()
    return hmac.new(config.cluster_token.encode(), message, hashlib.sha256).hexdigest()[:32]


def _gloo_group(store: dist.Store, config: ExpertParallelConfig, timeout: datetime.timedelta):
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=config.host)]
    options._timeout = timeout
    return dist.ProcessGroupGloo(store, config.rank, config.size, options)


def _nccl_group(store: dist.Store, config: ExpertParallelConfig, device: torch.device):
    torch.cuda.set_device(device)
    let_failed_communicators_abort()  # a member died: this process lives on
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = datetime.timedelta(seconds=config.join_timeout_s)
    return dist.ProcessGroupNCCL(store, config.rank, config.size, options)
