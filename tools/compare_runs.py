"""Compare the outputs of two clones that each ran the pipeline (`make run`): every file under data/,
models/ and reports/ (reports/timing excluded: wall-clock facts). Reports the files that are byte-identical,
the JSON files that differ only in their `code` fingerprint (a code change that leaves behaviour alone), and
every other difference.

    python tools/compare_runs.py /path/to/clone-before /path/to/clone-after
"""

import json
import re
import sys
from pathlib import Path

a, b = Path(sys.argv[1]), Path(sys.argv[2])


def files(root):
    out = {}
    for top in ("data", "models", "reports"):
        for p in (root / top).rglob("*"):
            if p.is_file() and "reports/timing" not in p.as_posix() and ".git" not in p.parts:
                out[p.relative_to(root).as_posix()] = p
    return out


def strip_code(x):
    if isinstance(x, dict):
        return {k: ("<code>" if k in ("code",) else strip_code(v)) for k, v in x.items()}
    if isinstance(x, list):
        return [strip_code(v) for v in x]
    return x


fa, fb = files(a), files(b)
same = code_only = 0
diff, only = [], sorted(set(fa) ^ set(fb))
for rel in sorted(set(fa) & set(fb)):
    x, y = fa[rel].read_bytes(), fb[rel].read_bytes()
    if x == y:
        same += 1
        continue
    if rel.endswith(".json"):
        try:
            if strip_code(json.loads(x)) == strip_code(json.loads(y)):
                code_only += 1
                continue
        except Exception:
            pass
    if rel.endswith(".md"):
        rx = re.sub(rb"[0-9a-f]{64}", b"<h>", x)
        ry = re.sub(rb"[0-9a-f]{64}", b"<h>", y)
        if rx == ry:
            diff.append(rel + "  (only 64-hex hashes differ)")
            continue
    diff.append(rel)
print(
    f"files: {len(fa)} vs {len(fb)}; identical {same}; JSON differing only in `code` {code_only}; "
    f"other differences {len(diff)}; only on one side {len(only)}"
)
for d in diff:
    print("  differs:", d)
for o in only:
    print("  one side:", o)
