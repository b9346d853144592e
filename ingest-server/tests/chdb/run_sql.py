"""Runs SQL statements in chdb (current ClickHouse, in-process) and prints the
last statement's result as TSV.

Usage: python3 run_sql.py STATEMENTS.json
STATEMENTS.json is a JSON list of SQL strings. Exit status 2 when chdb is not
installed, 1 when a statement fails (the error names it).
"""

import json
import sys
import tempfile

try:
    from chdb import session as chs
except ImportError:
    print("chdb is not installed: pip install -r ingest-server/tests/chdb/requirements.txt", file=sys.stderr)
    sys.exit(2)


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        statements = json.load(f)
    with tempfile.TemporaryDirectory() as path:
        sess = chs.Session(path)
        print("version", str(sess.query("SELECT version()", "TSV")).strip(), file=sys.stderr)
        result = ""
        for i, sql in enumerate(statements):
            try:
                result = str(sess.query(sql, "TSV"))
            except Exception as e:  # chdb raises its own error type
                print(f"statement {i} failed: {e}\n{sql}", file=sys.stderr)
                return 1
        sys.stdout.write(result)
        sess.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
