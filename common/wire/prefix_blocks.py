"""Names for cached prompt prefixes that nodes and control planes agree on.

A prompt is cut into blocks of ``BLOCK_TOKENS`` token ids; block k is named by a
64-bit (signed) hash chained over every block before it, so one name stands for the
whole prefix that ends with that block, and two prompts share block k's name
exactly when they share their first ``(k + 1) * BLOCK_TOKENS`` tokens. Nodes
publish the names of the blocks their prefix cache stores and evicts; control
planes compute the names of a prompt's blocks and look for the longest run a
node holds. Only hashes cross the wire, never the text or the token ids.
"""

import hashlib

import numpy as np

BLOCK_TOKENS = 16


def block_hashes(token_ids: list[int], num_blocks: int | None = None) -> list[int]:
    """The names of the first ``num_blocks`` whole blocks of ``token_ids`` (all of
    them when None); a trailing partial block has no name."""
    whole = len(token_ids) // BLOCK_TOKENS
    num_blocks = whole if num_blocks is None else min(num_blocks, whole)
    data = np.asarray(token_ids[: num_blocks * BLOCK_TOKENS], dtype="<u4").tobytes()
    step = 4 * BLOCK_TOKENS
    hashes, previous = [], b"\0" * 8
    for offset in range(0, len(data), step):
        previous = hashlib.blake2b(previous + data[offset : offset + step], digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "little", signed=True))
    return hashes
