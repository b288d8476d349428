"""Rows written in bulk on the hot batch paths (a batch of joins, a worker's closes): new
rows with one prepared statement, sent once per row with the driver's `executemany`;
changed rows with one `UPDATE` for them all, joined to a VALUES list (`rows_update`).

Measured on PostgreSQL, batches of 500 (the profile of a stopping worker): ending sessions
took 63 ms with `executemany` of one UPDATE per row, 54 ms as one joined UPDATE; opening
them, one multi-row INSERT took longer than `executemany` (130 ms against 96: psycopg's
client-side binding parses the statement's 8,500 placeholders in Python, where
`executemany` parses one row's once).

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


def rows_update(*, rows: Sequence[Model], fields: Sequence[str], raise_only: bool = False) -> None:
    """UPDATE these fields of these rows (all of one model), by primary key. `raise_only`
    (one field): a row whose stored value is already at least the new one keeps it, so that
    concurrent writers can only move the value forward (read positions)."""
    if not rows:
        return
    model = type(rows[0])
    opts = model._meta
    changed = [opts.get_field(name) for name in fields]
    key = opts.pk
    values = [
        [key.get_db_prep_save(row.pk, connection)]
        + [field.get_db_prep_save(getattr(row, field.attname), connection) for field in changed]
        for row in rows
    ]
    if raise_only and len(changed) != 1:
        raise ValueError("raise_only updates one field")
    chunk = max(1, MAX_PARAMETERS // (len(changed) + 1))
    for start in range(0, len(values), chunk):
        _update_from_values(model, changed, values[start : start + chunk], raise_only=raise_only)


# Bound parameters per statement: under SQLite's limit (32,766) and PostgreSQL's (65,535).
MAX_PARAMETERS = 30_000


def _update_from_values(
    model: type[Model], changed: list[Field], values: list[list], *, raise_only: bool = False
) -> None:
    """One statement for all these rows: `WITH v(key, f1, …) AS (VALUES (…), …) UPDATE table
    SET f1 = v.f1, … FROM v WHERE table.key = v.key` (SQLite 3.33+, PostgreSQL). PostgreSQL
    types a VALUES column from its values: the first row's are cast to the columns' types."""
    opts, quote = model._meta, connection.ops.quote_name
    table, key = quote(opts.db_table), opts.pk
    columns = [key, *changed]
    names = ["k", *(f"v{n}" for n in range(len(changed)))]
    if connection.vendor == "postgresql":
        first = ", ".join(f"CAST(%s AS {field.cast_db_type(connection)})" for field in columns)
    else:
        first = ", ".join(["%s"] * len(columns))
    rest = ", ".join(["%s"] * len(columns))
    rows_sql = ", ".join([f"({first})"] + [f"({rest})"] * (len(values) - 1))
    assignments = ", ".join(
        f"{quote(field.column)} = v.{name}" for field, name in zip(changed, names[1:], strict=True)
    )
    sql = (
        f"WITH v ({', '.join(names)}) AS (VALUES {rows_sql}) "
        f"UPDATE {table} SET {assignments} FROM v WHERE {table}.{quote(key.column)} = v.k"
    )
    if raise_only:
        column = f"{table}.{quote(changed[0].column)}"
        sql += f" AND ({column} IS NULL OR {column} < v.v0)"
    with connection.cursor() as cursor:
        cursor.execute(sql, [value for row in values for value in row])
