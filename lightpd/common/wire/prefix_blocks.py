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


def block_hashes(
    token_ids: list[int], first_block: int = 0, previous: int | None = None, namespace: int = 0
) -> list[int]:
    """The names of the whole blocks of ``token_ids`` from ``first_block`` on (a
    trailing partial block has no name). ``previous``: the name of block
    ``first_block - 1``, which the chain goes on from (None from block 0).
    ``namespace``: the prefix cache's (a tenant's); a chain from block 0 starts from
    it, so the same tokens in two namespaces share no name."""
    if (previous is None) != (first_block == 0):
        raise ValueError("a chain goes on from block 0, or from the name before first_block")
    if previous is None:
        previous = namespace
    start = first_block * BLOCK_TOKENS
    whole = start + (len(token_ids) - start) // BLOCK_TOKENS * BLOCK_TOKENS
    data = np.asarray(token_ids[start:whole], dtype="<u4").tobytes()
    step = 4 * BLOCK_TOKENS
    hashes = []
    chain = previous.to_bytes(8, "little", signed=True)
    for offset in range(0, len(data), step):
        chain = hashlib.blake2b(chain + data[offset : offset + step], digest_size=8).digest()
        hashes.append(int.from_bytes(chain, "little", signed=True))
    return hashes
