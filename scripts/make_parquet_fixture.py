"""Writes stages/tests/data/chat-sample.parquet from stages/tests/data/chat.jsonl the way
Hugging Face `datasets` stores a split: pyarrow, snappy, a `messages` column of
list<struct<role: string, content: string>> beside a `text` column of strings.

The Rust tests read it to prove the parquet reader handles what pyarrow writes. Rerun after
changing chat.jsonl:

    /work/.venv-parity/bin/python scripts/make_parquet_fixture.py
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATA = Path(__file__).resolve().parent.parent / "stages" / "tests" / "data"
# Small row groups so the reader has to cross row group boundaries.
ROW_GROUP_SIZE = 8


def main() -> None:
    lines = (DATA / "chat.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table(
        {
            "id": pa.array([r["id"] for r in records], pa.string()),
            "messages": pa.array(
                [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in records],
                pa.list_(message),
            ),
            # The text column the tests expect: the turns' contents, a blank line apart.
            "text": pa.array(["\n\n".join(m["content"] for m in r["messages"]) for r in records], pa.string()),
        }
    )
    out = DATA / "chat-sample.parquet"
    pq.write_table(table, out, compression="snappy", row_group_size=ROW_GROUP_SIZE)
    meta = pq.ParquetFile(out).metadata
    print(f"wrote {out} ({out.stat().st_size} bytes, {meta.num_rows} rows, {meta.num_row_groups} row groups)")


if __name__ == "__main__":
    main()
