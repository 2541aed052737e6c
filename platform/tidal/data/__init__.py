"""Sources -> documents -> tokenize -> pack -> shards; and the global-cursor loader."""
