"""The results seam: where `ctx.push_data`'s items go, beside the queue seam (`runner.queue`).

`protocol.ResultsSink` is what the runtime knows; `jsonl.JsonlDataset` (a local JSON-lines file, the embedded
default) and `apify.ApiDataset` (a dataset of the Apify API: the platform or `headlock serve`) implement it.
"""
