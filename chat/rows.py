"""Rows written in bulk on the hot batch paths (a batch of joins, a worker's closes): one
prepared statement, sent once per row with the driver's `executemany`.

`bulk_create` and `bulk_update` build one statement holding every row's values, preparing
each value through the compiler (expression checks, a placeholder each); `bulk_update` adds
a `CASE` per row and field. In a reconnect storm that was most of the database thread: a
batch of 500 joins inserts 500 sessions (and, for new users, their user and membership
rows), a stopping worker ends thousands. Here each value is prepared by its field alone
(`pre_save`, `get_db_prep_save`: what the ORM would send) and the statement is built once
per call. The drivers run `executemany` in C (sqlite3) or pipelined (psycopg).

What is given up, and not used by the callers: primary keys made by the database are not
read back (rows whose key is an auto field keep `pk` None), and no signals are sent (as
with the bulk methods).
"""

from __future__ import annotations

from collections.abc import Sequence

from django.db import connection
from django.db.models import Field, Model
from django.db.models.constants import OnConflict


def _insert_fields(model: type[Model]) -> list[Field]:
    opts = model._meta
    return [
        field
        for field in opts.local_concrete_fields
        if not (field.primary_key and getattr(field, "db_returning", False))
    ]


def rows_insert(*, rows: Sequence[Model], ignore_conflicts: bool = False) -> None:
    """INSERT these new rows, all of one model; with `ignore_conflicts`, a row whose key or
    unique fields are taken is skipped (as `bulk_create(ignore_conflicts=True)`)."""
    if not rows:
        return
    model = type(rows[0])
    fields = _insert_fields(model)
    ops, quote = connection.ops, connection.ops.quote_name
    on_conflict = OnConflict.IGNORE if ignore_conflicts else None
    suffix = ops.on_conflict_suffix_sql(fields, on_conflict, None, None) or ""
    sql = (
        f"{ops.insert_statement(on_conflict=on_conflict)} {quote(model._meta.db_table)}"
        f" ({', '.join(quote(field.column) for field in fields)})"
        f" VALUES ({', '.join(['%s'] * len(fields))}) {suffix}"
    )
    values = [
        [field.get_db_prep_save(field.pre_save(row, True), connection) for field in fields]
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, values)
    for row in rows:
        row._state.adding = False
        row._state.db = connection.alias


def rows_update(*, rows: Sequence[Model], fields: Sequence[str]) -> None:
    """UPDATE these fields of these rows (all of one model), by primary key."""
    if not rows:
        return
    model = type(rows[0])
    opts = model._meta
    changed = [opts.get_field(name) for name in fields]
    key = opts.pk
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in changed)
    sql = f"UPDATE {quote(opts.db_table)} SET {assignments} WHERE {quote(key.column)} = %s"
    values = [
        [field.get_db_prep_save(getattr(row, field.attname), connection) for field in changed]
        + [key.get_db_prep_save(row.pk, connection)]
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, values)
