"""Model transforms that change structure: structured pruning (prune/), and other restructurings."""
