"""The format layer: pipeline, header, section plan, and the only container writer and reader.

Everything that turns caches into container bytes or back goes through here: :func:`seqkv.encode` and
:func:`seqkv.decode` (:mod:`seqkv.codec`), pruned containers (:mod:`seqkv.pruning.container`), the
calibrated codec's rate control (:mod:`seqkv.calibrated_encoder`), the store's chunks
(:mod:`seqkv.store.chunk_codec`) and :func:`seqkv.analyze`.  The bytes: docs/format.md.
"""
from .container import FLAG_PRUNED, FORMAT_MAJOR, FORMAT_MINOR, MAGIC
from .header import ChunkInfo, Header, PositionsInfo, ProfileRef, PruningInfo, required_minor
from .pipeline import KINDS, Pipeline, SectionSymbols, section_name
from .plan import PER_HEAD, PLAIN, RESIDUAL, kept_section_name, section_order
from .reader import DEFAULT_MAX_DECODED_BYTES, ContainerReader, open_container
from .writer import write_container

__all__ = [
    "ChunkInfo", "ContainerReader", "DEFAULT_MAX_DECODED_BYTES", "FLAG_PRUNED", "FORMAT_MAJOR", "FORMAT_MINOR",
    "Header", "KINDS", "MAGIC", "PER_HEAD", "PLAIN", "Pipeline", "PositionsInfo", "ProfileRef", "PruningInfo",
    "RESIDUAL", "SectionSymbols", "kept_section_name", "open_container", "required_minor", "section_name",
    "section_order", "write_container",
]
