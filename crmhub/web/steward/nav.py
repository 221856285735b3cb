"""Moving through the open queue without deciding: the pair after a given one.

The order is the queue's (sync.review.list_reviews): most probable first, then by id. A key
(`j` on the compare view) walks it; past the last open pair it starts again at the top.
"""

from __future__ import annotations

from sqlalchemy import Connection, and_, or_, select

from sync.store import review_item

__all__ = ["open_after"]

_ORDER = (review_item.c.probability.desc(), review_item.c.id)


def open_after(conn: Connection, review_id: int) -> int | None:
    """The open pair that follows `review_id` in queue order (wrapping round), or None when
    no other pair is open."""
    open_items = select(review_item.c.id).where(
        review_item.c.status == "open", review_item.c.id != review_id
    )
    probability = conn.execute(
        select(review_item.c.probability).where(review_item.c.id == review_id)
    ).scalar()
    if probability is not None:
        later = open_items.where(
            or_(
                review_item.c.probability < probability,
                and_(review_item.c.probability == probability, review_item.c.id > review_id),
            )
        )
        found = conn.execute(later.order_by(*_ORDER).limit(1)).scalar()
        if found is not None:
            return int(found)
    first = conn.execute(open_items.order_by(*_ORDER).limit(1)).scalar()
    return None if first is None else int(first)
