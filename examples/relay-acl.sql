-- The relay access control table of the original pfxpold, for SQLite,
-- PostgreSQL and MySQL/MariaDB alike: which originating systems may send as
-- which senders.
--
--   origin:  a client IP address (as pfxpold normalises it: IPv6 in its
--            short lowercase form, IPv4-mapped IPv6 as plain IPv4) or a
--            client host name, lowercase
--   address: a sender address, lowercase, @domain for the whole domain,
--            or '' for the null sender (bounces)
--
-- SQLite:     python3 -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).executescript(open(sys.argv[2]).read())' relay-acl.sqlite relay-acl.sql
-- PostgreSQL: psql -d pfxpold -f relay-acl.sql
-- MariaDB:    mariadb pfxpold < relay-acl.sql  (see relay-acl-mysql.toml for
--             the database's collation)

CREATE TABLE relay_acl (
    origin  VARCHAR(255) NOT NULL,
    address VARCHAR(320) NOT NULL,
    PRIMARY KEY (origin, address)
);

INSERT INTO relay_acl (origin, address) VALUES
    ('192.0.2.10', 'scanner@example.com'),
    ('192.0.2.33', '@example.com'),
    ('2001:db8:10::33', '@example.com'),
    ('bulk.mail.example.com', 'newsletter@example.com');
