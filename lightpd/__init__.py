"""lightpd: disaggregated prefill/decode LLM serving with token attention.

Every module lives under this one name (``lightpd.common``, ``lightpd.kernels``,
``lightpd.controlplane``, ``lightpd.prefill_node``, ``lightpd.decode_node``), so the
wheel never writes a generic top-level package such as ``kernels`` over another's.
"""
