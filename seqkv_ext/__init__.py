"""Compiled helpers for seqkv (built by ``pip install -e .``).

* :mod:`seqkv_ext.ans` - fast decoder for constriction ``AnsCoder`` streams with
  static integer-frequency tables;
* :mod:`seqkv_ext.ans_encode` - the matching encoder (word for word equal to constriction);
* :mod:`seqkv_ext.ans_tables` - the frequency-table checks both share (``ans_tables.pxd``);
* :mod:`seqkv_ext.context_sections` - a ``context_ans`` section's coder part (channel offsets,
  classes and every class stream) decoded in one call, streams two at a time (``ans.pxd``: the
  decoder's tables and step, shared with :mod:`seqkv_ext.ans`);
* :mod:`seqkv_ext.crc32c` - CRC-32C (Castagnoli), slicing-by-8;
* :mod:`seqkv_ext.bitpack` - dense LSB-first packing of the low bits of integers;
* :mod:`seqkv_ext.trie` - ``TokenTrie``, a compact counting token trie with a
  PPM-style next-token distribution and a checksummed binary format;
* :mod:`seqkv_ext.predict`, :mod:`seqkv_ext.quantize`, :mod:`seqkv_ext.rope`,
  :mod:`seqkv_ext.varint` - the codec's per-element loops (temporal prediction, the
  calibrated quantizer both ways, RoPE into the cache layout, varint arrays).

This package does not depend on ``seqkv``; ``seqkv`` falls back to pure Python /
constriction when it is not built.
"""
from . import ans, bitpack, crc32c, trie

__all__ = ["ans", "bitpack", "crc32c", "trie"]
__version__ = "0.1.0"
