"""The only container writer: a header, its pipeline and the planned sections -> bytes."""
from __future__ import annotations

from ..errors import EncodeError
from .container import FLAG_PRUNED, pack_container
from .header import Header, required_minor
from .pipeline import Pipeline
from .plan import section_order


def write_container(header: Header, pipeline: Pipeline, sections: dict, *, flags: int = 0) -> bytes:
    """``sections`` maps each section the plan calls for (:func:`seqkv.format.plan.section_order`) to its
    payload; they are laid out in the plan's order and the minor version is the lowest the contents need."""
    order = section_order(header, pruned=bool(flags & FLAG_PRUNED))
    if set(sections) != set(order):
        missing, extra = sorted(set(order) - set(sections)), sorted(set(sections) - set(order))
        raise EncodeError(f"internal error: sections {missing} missing / {extra} unplanned")
    return pack_container(header.to_json(), [(name, sections[name]) for name in order], flags,
                          required_minor(flags, pipeline))
