"""Lake SQL (Trino/Presto) to DuckDB SQL, with sqlglot; refusals in the service's error shape.

Contract of ``translate(sql, resolve)``:

- The text must be one statement, a query: ``SELECT`` (with ``WITH``, subqueries, ``UNION``/
  ``INTERSECT``/``EXCEPT``, joins, ``UNNEST``). Anything else (``INSERT``, ``SET``, ``SELECT ..
  INTO``, ...) raises ``LakeError("InvalidQueryStatementException")`` naming the statement.
- ``FROM`` takes event data store ids, unquoted as in Lake (``FROM 0b9a..-..``) or quoted.
  ``resolve(id)`` returns the store (or raises ``EventDataStoreNotFoundException``); each names
  the store's DuckDB view.
  Any other table (qualified names, table functions such as ``read_csv``) is refused, naming it.
  A query must read at least one store.
- Trino's syntax and functions are transpiled by sqlglot; what sqlglot cannot express in DuckDB
  is refused naming the construct (sqlglot's unsupported-syntax errors), as is what it would
  silently drop (``FETCH ... WITH TIES``).
- The outermost projections get Trino's result names: the alias, else the column or last field
  name, else ``_colN`` (N counts from 0).
- Syntax errors raise ``InvalidQueryStatementException`` with sqlglot's description and the
  line and column. Nothing here logs the query text.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, SqlglotError, TokenError

from .catalog import UUID_RE, EventDataStore, LakeError

# sqlglot warns with the statement text when it falls back to a raw command: query text is
# user data and stays out of the log.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

MAX_STATEMENT = 10_000  # QueryStatement's max length in the service model
_UUID_IN_CODE = re.compile(r"(?<![\w\"-])([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                           r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?![\w\"-])")
_QUERY_ROOTS = (exp.Select, exp.SetOperation, exp.Subquery)
_STATEMENTS = {"insert", "delete", "update", "create", "drop", "merge", "set", "alter", "use",
               "describe", "pragma", "copy", "cache", "uncache", "refresh", "transaction",
               "commit", "rollback", "grant", "revoke", "analyze", "truncatetable", "attach",
               "detach", "show", "load", "install", "export", "summarize", "kill"}


@dataclass(frozen=True)
class Translated:
    sql: str                           # DuckDB SQL
    stores: tuple[EventDataStore, ...]  # the stores it reads, in order of first use


def invalid(message: str) -> LakeError:
    return LakeError("InvalidQueryStatementException", message)


def translate(sql: str, resolve: Callable[[str], EventDataStore]) -> Translated:
    if not isinstance(sql, str) or not sql.strip():
        raise invalid("QueryStatement is empty.")
    if len(sql) > MAX_STATEMENT:
        raise invalid(f"QueryStatement is longer than {MAX_STATEMENT} characters.")
    tree = _parse(_quote_store_ids(sql))
    if not isinstance(tree, _QUERY_ROOTS):
        if isinstance(tree, exp.Command):
            raise invalid(f"Only SELECT statements are allowed; found {tree.name.upper()}.")
        if tree.key in _STATEMENTS:
            raise invalid(f"Only SELECT statements are allowed; found {tree.key.upper()}.")
        raise invalid("Syntax error: the text is not a SELECT statement.")
    for select in tree.find_all(exp.Select):
        if select.args.get("into") is not None:
            raise invalid("SELECT ... INTO is not allowed: only SELECT statements are.")
    for fetch in tree.find_all(exp.Fetch):
        options = fetch.args.get("limit_options")
        if options is not None and (options.args.get("with_ties") or options.args.get("percent")):
            # sqlglot would drop these silently and change the result
            raise invalid("FETCH FIRST ... WITH TIES / PERCENT is not supported by the emulator.")
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    stores: dict[str, EventDataStore] = {}
    for table in list(tree.find_all(exp.Table)):
        _replace_table(table, ctes, resolve, stores)
    if not stores:
        raise invalid("The query reads no event data store: name one in FROM "
                      "(FROM <event data store id>).")
    _name_outer_columns(tree)
    try:
        text = tree.sql(dialect="duckdb", unsupported_level=ErrorLevel.RAISE)
    except SqlglotError as exc:
        raise invalid(f"Unsupported in this query: {_first_line(exc)}")
    except Exception as exc:  # sqlglot's generator on constructs it half-supports
        raise invalid(f"Unsupported in this query: sqlglot cannot write it for the engine "
                      f"({type(exc).__name__}).")
    return Translated(text, tuple(stores.values()))


def _quote_store_ids(sql: str) -> str:
    """Quote UUID-shaped names outside strings and quoted names, so ``FROM <id>`` parses."""
    try:
        tokens = sqlglot.Dialect.get_or_raise("trino").tokenize(sql)
    except TokenError as exc:
        raise invalid(f"Syntax error: {_first_line(exc)}")
    except Exception as exc:  # the tokenizer's own bugs on odd text
        raise invalid(f"Syntax error: the query could not be read ({type(exc).__name__}).")
    protected = [(t.start, t.end + 1) for t in tokens
                 if t.token_type in (sqlglot.TokenType.STRING, sqlglot.TokenType.IDENTIFIER)]
    out, last = [], 0
    for start, end in protected + [(len(sql), len(sql))]:
        out.append(_UUID_IN_CODE.sub(r'"\1"', sql[last:start]))
        out.append(sql[start:end])
        last = end
    return "".join(out)


def _parse(sql: str) -> exp.Expression:
    try:
        statements = [s for s in sqlglot.parse(sql, read="trino") if s is not None]
    except ParseError as exc:
        detail = exc.errors[0] if exc.errors else {}
        where = (f" at line {detail.get('line')}, column {detail.get('col')}"
                 if detail.get("line") else "")
        raise invalid(f"Syntax error{where}: {detail.get('description') or _first_line(exc)}")
    except SqlglotError as exc:
        raise invalid(f"Syntax error: {_first_line(exc)}")
    except RecursionError:
        raise invalid("The query is nested too deeply.")
    except Exception as exc:  # the parser's own bugs on odd text still get the service's shape
        raise invalid(f"Syntax error: the query could not be parsed ({type(exc).__name__}).")
    if len(statements) != 1:
        raise invalid(f"Exactly one statement is allowed; found {len(statements)}.")
    return statements[0]


def _replace_table(table: exp.Table, ctes: set[str], resolve, stores: dict) -> None:
    if not isinstance(table.this, exp.Identifier):
        name = table.this.sql(dialect="trino")[:100] if table.this else "?"
        raise invalid(f"Table functions are not supported: {name}. FROM takes an event data "
                      "store id.")
    if table.args.get("db") or table.args.get("catalog"):
        raise invalid(f"Qualified table names are not supported: {table.sql('trino')[:200]}. "
                      "FROM takes an event data store id.")
    name = table.name
    if name.lower() in ctes:
        return

    if not UUID_RE.match(name):
        raise invalid(f"Table {name[:100]} is not an event data store id: FROM takes the id "
                      "part of an event data store ARN (ListEventDataStores lists them).")
    store = resolve(name)
    stores.setdefault(store.id, store)
    table.set("this", exp.to_identifier(store.view, quoted=True))


def _name_outer_columns(tree: exp.Expression) -> None:
    select = tree
    while isinstance(select, (exp.SetOperation, exp.Subquery)):
        select = select.this if isinstance(select, exp.Subquery) else select.left
    if not isinstance(select, exp.Select):
        return
    names = []
    for index, projection in enumerate(select.expressions):
        if isinstance(projection, (exp.Alias, exp.Star)) or (
                isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star)):
            names.append(None)
            continue
        if isinstance(projection, exp.Column):
            names.append(None)  # DuckDB already names it after the column or last field
            continue
        if isinstance(projection, exp.Dot) and isinstance(projection.expression, exp.Identifier):
            name = projection.expression.name
        else:
            name = f"_col{index}"
        names.append(name)
    for projection, name in zip(list(select.expressions), names):
        if name is not None:
            projection.replace(exp.alias_(projection.copy(), name, quoted=True))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
