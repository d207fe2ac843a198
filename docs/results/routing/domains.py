"""Build a three-domain federation (issue 25 item 2): users that differ in *domain and format*, not language.

fortunes = the English Debian fortunes, news = AG News descriptions (all four classes, file order), plays = Tiny
Shakespeare turns (all speakers). Written to a JSONL (`{"user", "text"}` per line) under runs/ (the data's
licences are research-only: never commit the file). Usage: domains.py OUT.jsonl [SHARED_DATA_DIR]
Train on it with `--set corpus=OUT.jsonl --set corpus_format=jsonl` (the config's `max_chars` caps each user).
"""
import json
import sys
from pathlib import Path

from pocketlm.data.corpora import read_agnews, read_shakespeare
from pocketlm.data.fortunes import read_fortunes

out = Path(sys.argv[1])
data = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data")
users = {
    "fortunes": read_fortunes(["en"])["en"],
    "news": [d for docs in zip(*read_agnews(data / "agnews").values(), strict=False) for d in docs],
    "plays": [d for docs in read_shakespeare(data / "shakespeare" / "input.txt").values() for d in docs],
}
out.parent.mkdir(parents=True, exist_ok=True)
with out.open("w", encoding="utf-8") as f:
    for user, docs in users.items():
        for d in docs[:3000]:
            f.write(json.dumps({"user": user, "text": d}, ensure_ascii=False) + "\n")
print({u: len(d) for u, d in users.items()})
