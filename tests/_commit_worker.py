"""Commits N caption units into a store, skipping committed ones; killed at random by test_store."""

import sys

import pyarrow as pa

from store import CAPTION_SCHEMA, Store, captions_rel

root, n_units = sys.argv[1], int(sys.argv[2])
store = Store(root)
for i in range(n_units):
    vid = f"video{i:03d}"
    if store.is_done("captions", "v1", vid, f"fp{i}"):
        continue
    rows = [{"video_id": vid, "level": "clip", "start_s": 4.0 * k, "end_s": 4.0 * k + 4, "text": f"#C C does {k}",
             "score": 0.0, "fingerprint": f"fp{i}"} for k in range(50 + i)]
    rel = captions_rel("clip", "v1", vid)
    tmp = store.stage_table(rel, pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA))
    store.commit("captions", "v1", vid, f"fp{i}", {rel: tmp}, {"rows": len(rows)})
