"""The only container writer: a header, its pipeline and the planned sections -> bytes."""
from __future__ import annotations

from ..errors import CompressionBoundError, DecodeError, EncodeError
from .container import FLAG_PRUNED, pack_container
from .header import Header, required_minor
from .pipeline import Pipeline
from .plan import section_order
from .reader import ContainerReader

NO_CAP = 1 << 62   # the caller's max_decoded_bytes is a reader's choice, not a property of the bytes


def write_container(header: Header, pipeline: Pipeline, sections: dict, *, flags: int = 0) -> bytes:
    """``sections`` maps each section the plan calls for (:func:`seqkv.format.plan.section_order`) to its
    payload; they are laid out in the plan's order and the minor version is the lowest the contents need.

    Nothing is returned that the reader would refuse when opening it: the expansion bound
    (CompressionBoundError) and then every check the reader makes before decoding a section (the header
    fields, e.g. a layout whose RoPE values overflow float32, the pipeline, the plan, the positions)."""
    order = section_order(header, pruned=bool(flags & FLAG_PRUNED))
    if set(sections) != set(order):
        missing, extra = sorted(set(order) - set(sections)), sorted(set(sections) - set(order))
        raise EncodeError(f"internal error: sections {missing} missing / {extra} unplanned")
    blob = pack_container(header.to_json(), [(name, sections[name]) for name in order], flags,
                          required_minor(flags, pipeline))
    try:
        header.check_expansion(len(blob), error=CompressionBoundError)
    except CompressionBoundError as exc:
        raise CompressionBoundError(f"{exc}: the cache is nearly constant over very many tokens; encode fewer "
                                    "tokens per container (or with a smaller quantizer step)") from None
    try:
        ContainerReader(blob, max_decoded_bytes=NO_CAP, dialect="store_chunk" if header.is_store_chunk else "cache")
    except DecodeError as exc:
        raise EncodeError(f"the container would not be readable: {exc}") from None
    return blob
