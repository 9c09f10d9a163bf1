"""NCCL's settings for this process, set in one place before any communicator is
made (KV pairs in connector/collective.py, expert-parallel groups)."""

import os


def let_failed_communicators_abort() -> None:
    """A communicator that fails (a peer died) is aborted, and the process lives
    on: NCCL's default handling would end the whole process."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
