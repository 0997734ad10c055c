"""Ready handlers for `headlock run --handler`: `handlers.fetch:handle` and `handlers.crawl:handle`."""
