"""
The machinery of the C{sql} check (L{pfxpold.checks.sql}): the query
parameter lexer (L{pfxpold.sql.params}), the database drivers
(L{pfxpold.sql.drivers}) and the bounded connection pool
(L{pfxpold.sql.pool}).
"""
