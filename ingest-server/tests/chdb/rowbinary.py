"""Loads captured RowBinary INSERT bodies into chdb (current ClickHouse,
in-process) exactly as the ingest server sent them, then runs checks.

Usage: python3 rowbinary.py SPEC.json
SPEC: {"setup": [sql...], "inserts": [{"query": "INSERT INTO t(a,b) FORMAT RowBinary",
       "file": "/path/body.bin"}...], "statements": [sql...], "checks": [sql...]}
"statements" run after the inserts and must succeed (their output is ignored).
Prints each check's TSV result followed by a line "--". Exit status 2 when chdb
is not installed, 1 when a statement fails (the error names it).
"""

import json
import re
import sys
import tempfile

try:
    from chdb import session as chs
except ImportError:
    print("chdb is not installed: pip install -r ingest-server/tests/chdb/requirements.txt", file=sys.stderr)
    sys.exit(2)

INSERT = re.compile(r"^INSERT INTO\s+(`?)([^`.\s]+)\1\.(`?)([^`(\s]+)\3\s*\(([^)]*)\)\s*FORMAT RowBinary\s*$", re.S)


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    with tempfile.TemporaryDirectory() as path:
        sess = chs.Session(path)
        step = ""
        try:
            for sql in spec["setup"]:
                step = sql
                sess.query(sql)
            for ins in spec["inserts"]:
                step = ins["query"]
                m = INSERT.match(ins["query"].strip())
                if not m:
                    print(f"not a RowBinary insert with a column list: {ins['query']}", file=sys.stderr)
                    return 1
                db, table = m.group(2), m.group(4)
                cols = [c.strip().strip("`") for c in m.group(5).split(",")]
                types = dict(
                    line.split("\t", 1)
                    for line in str(
                        sess.query(f"SELECT name, type FROM system.columns WHERE database = '{db}' AND table = '{table}'", "TabSeparatedRaw")
                    ).strip().splitlines()
                )
                structure = ", ".join(f"`{c}` {types[c]}" for c in cols)
                structure = structure.replace("'", "\\'")
                column_list = ", ".join(f"`{c}`" for c in cols)
                step = f"{ins['query']} (body {ins['file']})"
                sess.query(f"INSERT INTO `{db}`.`{table}` ({column_list}) SELECT * FROM file('{ins['file']}', 'RowBinary', '{structure}')")
            for sql in spec.get("statements", []):
                step = sql
                sess.query(sql, "TSV")
            for sql in spec["checks"]:
                step = sql
                sys.stdout.write(str(sess.query(sql, "TSV")))
                sys.stdout.write("--\n")
        except Exception as e:  # chdb raises its own error type
            print(f"failed: {e}\n{step}", file=sys.stderr)
            return 1
        finally:
            sess.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
